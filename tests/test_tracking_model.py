"""The logged MLflow model: registered, aliased, and predicting what `visiontune predict` does."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pyfunc
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from real_config import default_params

from visiontune import tracking
from visiontune.cli import main as cli_main
from visiontune.data.images import open_rgb
from visiontune.data.transforms import DataConfig
from visiontune.evaluate.tta import ViewMaker, tta_views
from visiontune.models.classifier import ModelInfo, create_classifier, save_model_file
from visiontune.tracking.model import register_version

CLASSES = ["cats", "dogs"]


@pytest.fixture(scope="module")
def finetune_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model, _ = create_classifier(
        "tf_efficientnet_lite0", "none", len(CLASSES), hidden=(), dropout=0.0
    )
    with torch.no_grad():  # spread the untrained head's outputs so probabilities differ
        model.head[-1].weight.mul_(20)
    config = DataConfig(64, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    out = tmp_path_factory.mktemp("finetune")
    info = ModelInfo("tf_efficientnet_lite0", CLASSES, config, head_hidden=(), head_dropout=0.0)
    save_model_file(out / "model.safetensors", model.eval(), info)
    (out / "metrics.json").write_text(json.dumps({"valid_acc": 0.5}))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.safetensors").write_bytes(b"not logged")
    return out


def test_versions_are_registered_without_printing(tmp_path: Path, capsys) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = SimpleNamespace(model_uri=(tmp_path / "model").as_uri(), model_id=None)
    versions = [register_version(client, "tiny", logged, run_id=None) for _ in range(2)]
    assert versions == ["1", "2"]  # the second finds the registered model already there
    assert "registered model" not in capsys.readouterr().err


@pytest.mark.slow  # torch.export of the model + a registry round trip: ~15-40 s on 2 cores
def test_logged_model_is_registered_and_predicts_like_the_cli(
    finetune_out: Path, dogscats: Path, tmp_path: Path, capsys
) -> None:
    params = default_params(
        {
            "tracking": {
                "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
                "artifact_location": str(tmp_path / "mlruns"),
                "registered_model": "tiny-cats",
                "alias": "candidate",
            }
        }
    )
    env = {"VISIONTUNE_PIPELINE_ID": "model-test"}
    tracker = tracking.preflight(params, "finetune", environ=env, cwd=tmp_path)
    assert tracking.log_stage(tracker, params, finetune_out) == 0
    printed = capsys.readouterr()
    assert "registered model" not in printed.err and "Created version" not in printed.err
    assert " INFO " not in printed.err, "MLflow's INFO lines stay out of the stage's output"

    client = MlflowClient(tracking_uri=params.tracking.uri)
    version = client.get_model_version_by_alias("tiny-cats", "candidate")
    assert version.run_id == tracker.run_id
    # Weights once: the model and the self-contained file, never the checkpoints.
    top = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert "weights" in top and not any("checkpoint" in p for p in top)
    assert [a.path for a in client.list_artifacts(tracker.run_id, "weights")] == [
        "weights/model.safetensors"
    ]

    images = sorted((dogscats / "valid" / "cats").glob("*.jpg"))[:2]
    images += sorted((dogscats / "valid" / "dogs").glob("*.jpg"))[:2]
    photos = tmp_path / "photos"
    photos.mkdir()
    for image in images:
        shutil.copy(image, photos / image.name)
    capsys.readouterr()
    assert cli_main(["predict", str(finetune_out / "model.safetensors"), str(photos),
                     "--format", "json", "--top-k", "2", "--device", "cpu",
                     "--precision", "fp32"]) == 0  # fmt: skip
    rows = json.loads(capsys.readouterr().out)

    mlflow.set_tracking_uri(params.tracking.uri)
    loaded = mlflow.pyfunc.load_model("models:/tiny-cats@candidate")
    metadata = loaded.metadata.metadata
    assert metadata["classes"] == CLASSES
    # Served as pixels: the model normalises them itself, a client needs no mean/std.
    (spec,) = loaded.metadata.get_input_schema().inputs
    assert spec.type == np.dtype(np.uint8) and spec.shape == (-1, 3, 64, 64)
    # The plain view exactly as `visiontune predict` (and `evaluate`) decode and crop it.
    plain = ViewMaker(DataConfig(**metadata["data_config"]), tta_views(0))
    for row in rows:
        batch = plain(open_rgb(Path(row["path"]), min_size=plain.min_decode_size)).numpy()
        probabilities = np.asarray(loaded.predict(batch))[0]
        cli = {p["label"]: p["probability"] for p in row["predictions"]}
        expected = [cli[name] for name in metadata["classes"]]
        assert probabilities == pytest.approx(expected, abs=1e-4)
