"""The fine-tuned model in MLflow: pytorch flavour + registry alias + the safetensors file.

The MLflow model takes the plain centre view that `visiontune predict` feeds its model
(uint8 pixels N×3×H×W, cut as the data config in the model's metadata says; the model
normalises them itself) and returns class probabilities in the order of the `classes`
metadata, so `mlflow.pyfunc.load_model(uri).predict(batch)` matches `visiontune predict`
on the same images.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pytorch
import numpy as np
import torch
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.models.model import ModelInfo
from mlflow.protos.databricks_pb2 import ALREADY_EXISTS, RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec

import visiontune
from visiontune.tracking.runs import StageTracker


class ProbabilityModel(torch.nn.Module):
    """An ImageClassifier whose output is softmax probabilities in float32 (what is served)."""

    def __init__(self, classifier: torch.nn.Module) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier(images).float(), dim=1)


def _requirements() -> list[str]:
    import safetensors
    import timm
    import torchvision

    return [
        f"torch=={torch.__version__.split('+')[0]}",
        f"torchvision=={torchvision.__version__.split('+')[0]}",
        f"timm=={timm.__version__}",
        f"safetensors=={safetensors.__version__}",
        f"visiontune=={visiontune.__version__}",
    ]


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
    """Log `model_file` as the run's MLflow model (+ the file itself), register it, alias it.

    Returns `{"model_uri": ..., "version": ...}` (version None when not registered).
    """
    from visiontune.models.classifier import load_model_file

    assert tracker.client is not None and tracker.store is not None
    classifier, info = load_model_file(model_file)
    served = ProbabilityModel(classifier).eval()
    size = info.data_config.image_size
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, 3, size, size))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, len(info.classes)))]),
    )
    # Two mid-grey images: the default "pt2" format (torch.export, no pickle) traces with
    # this example and would freeze a batch dimension of size 1.
    example = np.full((2, 3, size, size), 128, dtype=np.uint8)
    metadata = {
        "classes": list(info.classes),
        "data_config": dataclasses.asdict(info.data_config),
        "backbone": info.backbone,
        # How `visiontune predict` and `evaluate` feed the model (no TTA; uint8 pixels):
        "preprocessing": "ViewMaker(DataConfig(**data_config), tta_views(0))"
        "(open_rgb(path, min_size=maker.min_decode_size)) from visiontune.evaluate.tta",
    }
    mlflow.set_tracking_uri(tracker.store.uri)
    with mlflow.start_run(run_id=tracker.run_id):
        logged = mlflow.pytorch.log_model(
            served,
            name="model",
            signature=signature,
            input_example=example,
            metadata=metadata,
            pip_requirements=_requirements(),
        )
    # The self-contained file `visiontune predict` loads: stored once, no checkpoints.
    tracker.log_artifact(model_file, "weights")
    version = None
    if registered_model:
        version = register_version(tracker.client, registered_model, logged, tracker.run_id)
        tracker.client.set_registered_model_alias(registered_model, alias, str(version))
        tracker.client.set_model_version_tag(
            registered_model, str(version), "visiontune.backbone", info.backbone
        )
    return {"model_uri": logged.model_uri, "version": version}
