"""The logged MLflow model: registered, aliased, loaded from code, and predicting from image
bytes what `visiontune predict` prints for the same files (in process; `mlflow models serve`
as the docs show it: tests/test_walkthrough.py)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import mlflow
import mlflow.pyfunc
import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient
from real_config import default_params
from records import model_info

from visiontune import tracking
from visiontune.cli import main as cli_main
from visiontune.data.transforms import DataConfig
from visiontune.models.classifier import (
    InferenceSettings,
    build_classifier,
    save_model_file,
)
from visiontune.tracking.model import register_version

CLASSES = ["cats", "dogs"]
MODEL = "tiny-cats"
REPO_ROOT = Path(__file__).resolve().parents[1]
# What evaluate registers the model with: the centre crop and its mirror, at fp32.
INFERENCE = InferenceSettings(n_augment=1, zoom=1.15, precision="fp32")


@pytest.fixture(scope="module")
def finetune_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    config = DataConfig(64, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.875)
    out = tmp_path_factory.mktemp("finetune")
    info = model_info(classes=CLASSES, data_config=config, inference=INFERENCE)  # evaluate's
    model = build_classifier(info)
    with torch.no_grad():  # spread the untrained head's outputs so probabilities differ
        model.head[-1].weight.mul_(20)
    save_model_file(out / "model.safetensors", model.eval(), info)
    (out / "metrics.json").write_text(json.dumps({"valid_acc": 0.5}))
    (out / "checkpoints").mkdir()
    (out / "checkpoints" / "last.safetensors").write_bytes(b"not logged")
    return out


@pytest.fixture(scope="module")
def photos(dogscats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Four JPEGs and a file that is no image."""
    root = tmp_path_factory.mktemp("photos")
    for kind in ("cats", "dogs"):
        for image in sorted((dogscats / "valid" / kind).glob("*.jpg"))[:2]:
            shutil.copy(image, root / image.name)
    (root / "broken.jpg").write_bytes(b"\xff\xd8 a truncated header")
    return root


@pytest.fixture(scope="module")
def registry(finetune_out: Path, tmp_path_factory: pytest.TempPathFactory):
    """The finetune stage's model logged and registered as `tiny-cats@candidate`."""
    tmp = tmp_path_factory.mktemp("registry")
    params = default_params(
        {
            "tracking": {
                "uri": f"sqlite:///{tmp / 'mlflow.db'}",
                "artifact_location": str(tmp / "mlruns"),
                "registered_model": MODEL,
                "alias": "candidate",
            }
        }
    )
    env = {"VISIONTUNE_PIPELINE_ID": "model-test"}
    # As the evaluate stage logs it: its file, which records the views it scored.
    tracker = tracking.preflight(params, "evaluate", environ=env, cwd=tmp)
    model = finetune_out / "model.safetensors"
    code = tracking.log_stage(tracker, params, finetune_out, model=model)
    return SimpleNamespace(uri=params.tracking.uri, run_id=tracker.run_id, code=code, root=tmp)


def _registered_weights(registry) -> Path:
    """The registered model's own file, as a user downloads it for `visiontune predict`."""
    uri = f"runs:/{registry.run_id}/weights/model.safetensors"
    mlflow.set_tracking_uri(registry.uri)
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(registry.root / "dl")))


def _cli_probabilities(model_file: Path, photos: Path, capsys) -> dict[str, list[float]]:
    """`visiontune predict` (the model's own TTA views and precision): name → probabilities."""
    capsys.readouterr()
    assert cli_main(["predict", str(model_file), str(photos), "--format", "json",
                     "--top-k", str(len(CLASSES)), "--device", "cpu"]) == 0  # fmt: skip
    out = {}
    for row in json.loads(capsys.readouterr().out):
        if not row["error"]:
            cli = {p["label"]: p["probability"] for p in row["predictions"]}
            out[Path(row["path"]).name] = [cli[name] for name in CLASSES]
    return out


def _check_answer(frame: pd.DataFrame, names: list[str], expected: dict[str, list[float]]):
    assert list(frame.columns) == ["label", "error", *CLASSES]
    for name, (_, row) in zip(names, frame.iterrows(), strict=True):
        if name == "broken.jpg":  # an error for its row, not a failed batch
            assert row["error"] and not row["label"]
            continue
        assert row["error"] == ""
        assert [row[c] for c in CLASSES] == pytest.approx(expected[name], abs=1e-5)
        assert row["label"] == CLASSES[max(range(len(CLASSES)), key=expected[name].__getitem__)]


def test_versions_are_registered_without_printing(tmp_path: Path, capsys) -> None:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    logged = SimpleNamespace(model_uri=(tmp_path / "model").as_uri(), model_id=None)
    versions = [register_version(client, "tiny", logged, run_id=None) for _ in range(2)]
    assert versions == ["1", "2"]  # the second finds the registered model already there
    assert "registered model" not in capsys.readouterr().err


@pytest.mark.slow  # logging + loading the model from code: ~20-30 s on 2 cores
def test_logged_model_takes_image_bytes_and_predicts_like_the_cli(
    registry, finetune_out: Path, photos: Path, capsys
) -> None:
    assert registry.code == 0
    client = MlflowClient(tracking_uri=registry.uri)
    version = client.get_model_version_by_alias(MODEL, "candidate")
    assert version.run_id == registry.run_id
    # Weights: the model's artifact and the self-contained file, never the checkpoints.
    top = {a.path for a in client.list_artifacts(registry.run_id)}
    assert "weights" in top and not any("checkpoint" in p for p in top)

    mlflow.set_tracking_uri(registry.uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@candidate"))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not any(name.endswith((".pkl", ".pt", ".pth")) for name in files), files
    assert "code/visiontune/serving/predictor.py" in files
    assert not any(n.endswith(("config.py", "fileio.py", "cli.py")) for n in files), files
    requirements = (local / "requirements.txt").read_text()
    assert "visiontune" not in requirements and "torch==" in requirements

    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL}@candidate")
    meta = loaded.metadata
    assert meta.flavors["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert meta.metadata["classes"] == CLASSES
    assert meta.metadata["inference"] == {"n_augment": 1, "zoom": 1.15, "precision": "fp32"}
    (spec,) = meta.get_input_schema().inputs
    assert (spec.name, spec.type.name) == ("image", "binary")
    assert meta.get_output_schema().input_names() == ["label", "error", *CLASSES]

    names = sorted(p.name for p in photos.iterdir())
    frame = pd.DataFrame({"image": [(photos / n).read_bytes() for n in names]})
    expected = _cli_probabilities(_registered_weights(registry), photos, capsys)
    _check_answer(loaded.predict(frame), names, expected)
    plain = loaded.predict(frame, params={"tta": False})  # the centre crop alone
    assert names[1] != "broken.jpg"
    assert plain.loc[1, CLASSES[0]] != pytest.approx(expected[names[1]][0], abs=1e-6)


@pytest.mark.slow  # resolves the pinned requirements against the package index (network)
def test_requirements_install_from_the_public_index(registry) -> None:
    mlflow.set_tracking_uri(registry.uri)
    local = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}@candidate"))
    # Each pinned requirement, as listed, from the index. --no-deps: the pins come from one
    # working environment, and resolving torch's and mlflow's trees took pip 20 s of CPU.
    report = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
         "--no-deps", "--report", "-", "-r", str(local / "requirements.txt")],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert report.returncode == 0, report.stderr[-3000:]
    found = {item["metadata"]["name"].lower(): item["metadata"]["version"]
             for item in json.loads(report.stdout)["install"]}  # fmt: skip
    pinned = dict(line.split("==") for line in (local / "requirements.txt").read_text().split())
    assert found == {name.lower(): version for name, version in pinned.items()}
    assert {"torch", "timm", "safetensors", "mlflow"} <= found.keys()
    assert "visiontune" not in found
