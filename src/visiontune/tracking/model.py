"""Log evaluate's model file as the run's MLflow model, as code (`serving/image_model.py`):
nothing is pickled, the weights are the model file, and the visiontune modules it needs
travel with it, so its requirements are public packages only. Register it and alias it."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema

import visiontune
from visiontune.config import TrackingParams
from visiontune.tracking.runs import StageTracker

PACKAGE_ROOT = Path(visiontune.__file__).resolve().parent
# The modules a served model imports, by package (each with its __init__.py, which imports
# nothing): no params code, no pydantic, no tqdm.
SHIPPED_MODULES = {
    ".": ("cores.py", "runtime.py"),
    "data": ("images.py", "pixels.py", "transforms.py"),
    "evaluate": ("tta.py",),
    "models": ("classifier.py", "head.py", "record.py"),
    "serving": ("predictor.py",),
}


def requirements() -> list[str]:
    """What the served model imports, pinned to the versions it was logged with, and where
    installed the HTTP parser and event loop of `mlflow models serve`'s uvicorn: without them
    a batch of 32 posted photos took ~60 ms more (134-144 -> 113-121 images/s)."""
    pins = []
    for name in ("httptools", "uvloop"):
        with contextlib.suppress(PackageNotFoundError):  # not on this platform (uvloop)
            pins.append(f"{name}=={version(name)}")
    imported = ("torch", "torchvision", "timm", "safetensors", "pillow", "numpy", "pandas")
    # A local build tag (2.x+cpu) is no index's version.
    return pins + [f"{name}=={version(name).split('+')[0]}" for name in imported]


def ship_code(target: Path) -> Path:
    """Copy the modules a served model needs into `target`/visiontune; returns that folder."""
    root = target / "visiontune"
    for package, modules in SHIPPED_MODULES.items():
        (root / package).mkdir(parents=True, exist_ok=True)
        for name in ("__init__.py", *modules):
            shutil.copyfile(PACKAGE_ROOT / package / name, root / package / name)
    return root


def image_signature(classes: list[str]) -> ModelSignature:
    """Input: one binary column `image`; output: `label`, `error`, a column per class."""
    clashing = [name for name in classes if name in ("label", "error")]
    if clashing:
        raise ValueError(f"class names {clashing} clash with the output columns label/error")
    outputs = [ColSpec("string", "label"), ColSpec("string", "error")]
    outputs += [ColSpec("double", name) for name in classes]
    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(outputs),
        params=ParamSchema([ParamSpec("tta", "boolean", True)]),
    )


def _example_image() -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), (128, 96, 64)).save(buffer, format="PNG")
    return buffer.getvalue()


def register_version(client: MlflowClient, name: str, logged: ModelInfo, run_id: str | None) -> str:
    """A new version of registered model `name` (created if missing) for the logged model:
    `log_model(registered_model_name=...)` without its lines on stderr mid-stage."""
    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    created = client.create_model_version(
        name, source=logged.model_uri, run_id=run_id, model_id=logged.model_id
    )
    return str(created.version)


def version_alias(alias: str, exp_name: str | None) -> str:
    """The alias a new version takes: `tracking.alias` from a workspace `dvc repro` only, so
    experiments finishing in any order never take it over; `exp-<name>` from `dvc exp run`."""
    return alias if exp_name is None else "exp-" + re.sub(r"[^A-Za-z0-9_-]", "-", exp_name)


def log_model(tracker: StageTracker, model_file: Path, section: TrackingParams) -> None:
    """Log `model_file` as the run's MLflow model and as a file; register and alias it. The
    file records the TTA views and precision evaluate scored, and the served model predicts
    with them: changing them re-evaluates and re-registers, never retrains."""
    from visiontune.models.record import read_model_info
    from visiontune.serving.predictor import inference_settings

    info = read_model_info(model_file)
    settings = inference_settings(info, str(model_file))  # a file without them serves nothing
    metadata = {
        "classes": list(info.classes),
        "data_config": info.data_config.to_dict(),
        "backbone": info.backbone,
        "inference": dataclasses.asdict(settings),
        "input": "column 'image': encoded image bytes (base64 in JSON)",
        "visiontune_version": visiontune.__version__,
    }
    mlflow.set_tracking_uri(tracker.store.uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run(run_id=tracker.run_id):
        logged = mlflow.pyfunc.log_model(
            name="model",
            python_model=PACKAGE_ROOT / "serving" / "image_model.py",
            artifacts={"weights": str(model_file)},
            code_paths=[str(ship_code(Path(tmp)))],
            signature=image_signature(list(info.classes)),
            input_example=pd.DataFrame({"image": [_example_image()]}),
            metadata=metadata,
            pip_requirements=requirements(),
        )
    # The self-contained file `visiontune predict` loads: stored once, no checkpoints.
    tracker.log_artifact(model_file, "weights")
    if not section.registered_model:
        return
    name = section.registered_model
    model_version = register_version(tracker.client, name, logged, tracker.run_id)
    alias = version_alias(section.alias, tracker.exp_name)
    tracker.client.set_registered_model_alias(name, alias, model_version)
    tags = {"visiontune.backbone": info.backbone, "dvc.exp_name": tracker.exp_name}
    for key, value in tags.items():
        if value is not None:
            tracker.client.set_model_version_tag(name, model_version, key, value)
