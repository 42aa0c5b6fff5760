"""stages/evaluate.py then stages/report.py in-process, on real photos and a small model file."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image
from project_copy import stage_argv
from records import model_info

from visiontune.data.transforms import DataConfig
from visiontune.models.classifier import build_classifier, save_model_file

REPO_ROOT = Path(__file__).resolve().parents[2]
CFG = DataConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                 crop_pct=0.875)  # fmt: skip


def _stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"stage_{name}", REPO_ROOT / "stages" / f"{name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def project(tmp_path: Path, dogscats: Path) -> Path:
    torch.manual_seed(0)
    info = model_info(data_config=CFG, inference=None)  # as finetune writes it
    model = build_classifier(info)
    with torch.no_grad():
        model.head[-1].weight.mul_(20)
    save_model_file(tmp_path / "model.safetensors", model.eval(), info)
    rows = [
        (f"valid/{kind}/{p.name}", kind)
        for kind in ("cats", "dogs")
        for p in sorted((dogscats / "valid" / kind).glob("*.jpg"))[:3]
    ]
    pd.DataFrame(rows, columns=["path", "label"]).to_csv(tmp_path / "valid.csv", index=False)
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["runtime"].update(num_workers=0)
    params["tracking"].update(enabled=False)  # this test is about the files, not MLflow
    params["tta"].update(n_augment=2, batch_size=4)
    params["report"].update(top_losses=4)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    lr_find = tmp_path / "lr_find"
    lr_find.mkdir()
    lrs = np.geomspace(1e-6, 1, 20)
    pd.DataFrame({"step": range(20), "lr": lrs, "loss": 1 + lrs, "smoothed_loss": 1 + lrs}).to_csv(
        lr_find / "curve.csv", index=False
    )
    (lr_find / "suggestion.json").write_text(json.dumps({"lr": 1e-3, "method": "valley"}))
    steps = pd.DataFrame(
        {"step": range(6), "epoch": [0, 0, 0, 1, 1, 1], "loss": np.linspace(1, 0.5, 6)}
    )
    steps["lr_group0"], steps["lr_group1"] = 1e-4, 1e-3
    steps.to_csv(tmp_path / "steps.csv", index=False)
    return tmp_path


def test_evaluate_then_report(project: Path, dogscats: Path):
    common = ["--params", str(project / "params.yaml"), "--model",
              str(project / "model.safetensors"), "--prepared", str(dogscats)]  # fmt: skip
    evaluated = project / "evaluate"
    assert _stage("evaluate").main([*common, "--valid", str(project / "valid.csv"),
                                    "--out", str(evaluated)]) == 0  # fmt: skip
    metrics = json.loads((evaluated / "metrics.json").read_text())
    assert metrics["n_images"] == 6 and metrics["n_views"] == 3
    assert metrics["tta_gain"] == pytest.approx(metrics["accuracy_tta"] - metrics["accuracy"])
    predictions = pd.read_csv(evaluated / "predictions.csv")
    assert list(predictions.columns) == ["path", "label", "predicted", "prob", "loss"]
    probs = pd.read_csv(evaluated / "probabilities.csv")
    assert list(probs.columns) == ["path", "cats", "dogs"]
    np.testing.assert_allclose(probs[["cats", "dogs"]].sum(axis=1), 1, atol=1e-5)
    assert (predictions["loss"].mean()) == pytest.approx(metrics["loss_tta"])
    assert ((predictions["label"] == predictions["predicted"]).mean()) == pytest.approx(
        metrics["accuracy_tta"]
    )
    assert set(pd.read_csv(evaluated / "per_class.csv")["class"]) == {"cats", "dogs"}

    report = project / "report"
    assert _stage("report").main([*common, "--evaluate", str(evaluated), "--out", str(report),
                                  "--lr-find", str(project / "lr_find"),
                                  "--steps", str(project / "steps.csv")]) == 0  # fmt: skip
    confusion = pd.read_csv(report / "confusion.csv")
    assert confusion["actual"].tolist() == predictions["label"].tolist()
    assert confusion["predicted"].tolist() == predictions["predicted"].tolist()
    for name in ("confusion", "top_losses", "lr_find", "lr_schedule"):
        with Image.open(report / f"{name}.png") as img:
            assert img.format == "PNG"
    assert f"{metrics['accuracy_tta']:.4f}" in (report / "report.md").read_text()


def test_evaluate_rejects_bad_params(project: Path, capsys):
    (project / "bad.yaml").write_text("tta:\n  n_augment: 99\n")
    assert _stage("evaluate").main(stage_argv("evaluate", params=project / "bad.yaml")) == 2
    assert "tta.n_augment" in capsys.readouterr().err
