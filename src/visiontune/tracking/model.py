"""The fine-tuned model in MLflow: a pyfunc model from code + registry alias + the model file.

The logged model takes encoded images (a column `image` of bytes: PNG, JPEG, WebP, ...)
and returns `label`, `error` and one probability column per class, in class order. It is
logged as code (`visiontune/serving/image_model.py`, MLflow's models-from-code): no pickle
in the artifact, nothing unpickled at load. The weights are the safetensors model file
(artifact `weights`); the few visiontune modules the prediction needs travel with it
(`code_paths`), so its requirements are public packages only. It predicts through the same
`ImagePredictor` path as `visiontune predict`, with the TTA views and precision evaluate
recorded in the model file (mirrored in the MLflow model's metadata).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import visiontune
from visiontune.tracking.runs import StageTracker

PACKAGE_ROOT = Path(visiontune.__file__).resolve().parent
MODEL_CODE = PACKAGE_ROOT / "serving" / "image_model.py"
# The modules a served model imports (and nothing else: no params code, no pydantic, no
# tqdm). The subpackages' __init__ files import nothing.
SHIPPED_MODULES = (
    "__init__.py",
    "cores.py",
    "runtime.py",
    "data/__init__.py",
    "data/images.py",
    "data/pixels.py",
    "data/transforms.py",
    "evaluate/__init__.py",
    "evaluate/tta.py",
    "models/__init__.py",
    "models/classifier.py",
    "models/head.py",
    "models/record.py",
    "serving/__init__.py",
    "serving/predictor.py",
)
_RESERVED_COLUMNS = ("label", "error")


def _server_speedups() -> list[str]:
    """The HTTP parser and event loop that `mlflow models serve`'s uvicorn uses when they are
    installed: with its pure-Python fallbacks a batch of 32 posted photos (1.3 MB of JSON)
    took ~60 ms more, served 113-121 -> 134-144 images/s."""
    from importlib.metadata import PackageNotFoundError, version

    pins = []
    for name in ("httptools", "uvloop"):
        with contextlib.suppress(PackageNotFoundError):  # not on this platform (uvloop)
            pins.append(f"{name}=={version(name)}")
    return pins


def requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was logged with, and what
    makes its server fast."""
    import numpy
    import PIL
    import safetensors
    import timm
    import torch
    import torchvision

    def plain(version: str) -> str:
        return version.split("+")[0]  # a local build tag (2.x+cpu) is no index's version

    return [
        *_server_speedups(),
        f"torch=={plain(torch.__version__)}",
        f"torchvision=={plain(torchvision.__version__)}",
        f"timm=={timm.__version__}",
        f"safetensors=={safetensors.__version__}",
        f"pillow=={PIL.__version__}",
        f"numpy=={numpy.__version__}",
        f"pandas=={pd.__version__}",
    ]


def ship_code(target: Path) -> Path:
    """Copy the modules a served model needs into `target`/visiontune; returns that folder."""
    root = Path(target) / "visiontune"
    for name in SHIPPED_MODULES:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(PACKAGE_ROOT / name, root / name)
    return root


def image_signature(classes: list[str]) -> ModelSignature:
    """Input: one binary column `image`; output: `label`, `error`, a column per class."""
    clashing = [name for name in classes if name in _RESERVED_COLUMNS]
    if clashing:
        raise ValueError(f"class names {clashing} clash with the output columns label/error")
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [
                ColSpec("string", "label"),
                ColSpec("string", "error"),
                *(ColSpec("double", name) for name in classes),
            ]
        ),
        params=ParamSchema([ParamSpec("tta", "boolean", True)]),
    )


def _example_image() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (128, 96, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def register_version(client: MlflowClient, name: str, logged: ModelInfo, run_id: str | None) -> str:
    """A new version of registered model `name` (created if missing) for the logged model.

    What `log_model(registered_model_name=...)` does, without its "Successfully registered
    model" and "Created version" lines on stderr in the middle of the stage's output.
    """
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in {
            ErrorCode.Name(c) for c in (RESOURCE_ALREADY_EXISTS, ALREADY_EXISTS)
        }:
            raise
    created = client.create_model_version(
        name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id
    )
    return str(created.version)


def log_model(
    tracker: StageTracker,
    model_file: Path,
    *,
    registered_model: str | None,
    alias: str,
) -> dict[str, Any]:
    """Log `model_file` as the run's MLflow model (+ the file itself); register it, alias it.

    The file is evaluate's: it records the views and precision evaluate scored, and the
    served model predicts with them. Changing them re-evaluates and re-registers, and
    never retrains. Returns `{"model_uri": ..., "version": ...}` (version None when not
    registered).
    """
    from visiontune.models.record import read_model_info
    from visiontune.serving.predictor import inference_settings

    info = read_model_info(model_file)
    inference_settings(info, str(model_file))  # a file without them serves nothing
    return _log_model_file(tracker, model_file, info, registered_model, alias)


def _log_model_file(tracker, model_file, info, registered_model, alias) -> dict[str, Any]:
    metadata = {
        "classes": list(info.classes),
        "data_config": info.data_config.to_dict(),
        "backbone": info.backbone,
        # The TTA views and precision the model predicts with (also in the model file).
        "inference": dataclasses.asdict(info.inference),
        "input": "column 'image': encoded image bytes (base64 in JSON)",
        "visiontune_version": visiontune.__version__,
    }
    example = pd.DataFrame({"image": [_example_image()]})
    mlflow.set_tracking_uri(tracker.store.uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=tracker.run_id):
        logged = mlflow.pyfunc.log_model(
            name="model",
            python_model=MODEL_CODE,
            artifacts={"weights": str(model_file)},
            code_paths=[str(ship_code(Path(tmp)))],
            signature=image_signature(list(info.classes)),
            input_example=example,
            metadata=metadata,
            pip_requirements=requirements(),
        )
    # The self-contained file `visiontune predict` loads: stored once, no checkpoints.
    tracker.log_artifact(model_file, "weights")
    version = None
    if registered_model:
        version = register_version(tracker.client, registered_model, logged, tracker.run_id)
        tracker.client.set_registered_model_alias(
            registered_model, version_alias(alias, tracker.exp_name), str(version)
        )
        tags = {"visiontune.backbone": info.backbone, "dvc.exp_name": tracker.exp_name}
        for key, value in tags.items():
            if value is not None:
                tracker.client.set_model_version_tag(registered_model, str(version), key, value)
    return {"model_uri": logged.model_uri, "version": version}


def version_alias(alias: str, exp_name: str | None) -> str:
    """The alias a newly registered version takes.

    `tracking.alias` follows the workspace: only `dvc repro` moves it, so experiments that
    finish in any order never take it over. A version from `dvc exp run` gets an alias of its
    own, `exp-<experiment name>` (`models:/visiontune@exp-fiery-pita`), and keeps it.
    """
    if exp_name is None:
        return alias
    return "exp-" + re.sub(r"[^A-Za-z0-9_-]", "-", exp_name)
