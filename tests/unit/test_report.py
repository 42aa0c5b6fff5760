"""The report renders legibly-sized files for 2 and 120 classes from known probabilities."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from real_config import default_section
from records import model_info

from visiontune.config import ReportParams
from visiontune.data.transforms import DataConfig
from visiontune.evaluate.report import build_report, tta_gain_line
from visiontune.models.classifier import build_classifier

CFG = DataConfig(image_size=64, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="bicubic",
                 crop_pct=0.875)  # fmt: skip


def _synthetic(n_classes: int, per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(n_classes), per_class)
    logits = rng.normal(size=(len(labels), n_classes))
    logits[np.arange(len(labels)), labels] += 2.5
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probs, labels


def _metrics(probs: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    acc = float((probs.argmax(1) == labels).mean())
    return {"n_images": len(labels), "n_views": 5, "accuracy": acc - 0.01, "loss": 0.5,
            "accuracy_tta": acc, "loss_tta": 0.45, "tta_gain": 0.01,
            "tta_images_gained": 3, "tta_images_lost": 1, "tta_gain_p": 0.625}  # fmt: skip


@pytest.mark.parametrize("n_classes", [2, 120])
def test_report_files(tmp_path: Path, dogscats: Path, n_classes: int):
    probs, labels = _synthetic(n_classes, per_class=4 if n_classes > 2 else 20)
    photos = sorted((dogscats / "valid" / "cats").glob("*.jpg"))[:3]
    paths = [f"valid/cats/{photos[i % 3].name}" for i in range(len(labels))]
    classes = [f"breed_{i:03d}_with_a_long_name" for i in range(n_classes)]
    steps = pd.DataFrame({"step": range(40), "epoch": np.repeat([0, 1], 20),
                          "loss": np.linspace(1, 0.2, 40),
                          "lr_group0": 1e-4, "lr_group1": 1e-3, "lr_group2": 1e-2})  # fmt: skip
    lrs = np.geomspace(1e-6, 1, 30)
    curve = pd.DataFrame({"step": range(30), "lr": lrs, "loss": 1 + (np.log10(lrs) + 3) ** 2 / 9,
                          "smoothed_loss": 1 + (np.log10(lrs) + 3) ** 2 / 9})  # fmt: skip
    model = build_classifier(model_info(classes=classes, data_config=CFG))
    files = build_report(
        tmp_path / "report", probs, labels, paths, classes, dogscats, CFG, model,
        _metrics(probs, labels), default_section(ReportParams, top_losses=4, most_confused=5),
        lr_curve=curve, lr_suggestion=1e-3, steps=steps,
    )  # fmt: skip

    confusion = pd.read_csv(files.confusion_csv)
    assert list(confusion.columns) == ["actual", "predicted"]
    assert len(confusion) == len(labels)
    assert (confusion["actual"] == [classes[i] for i in labels]).all()
    assert (confusion["predicted"] == [classes[i] for i in probs.argmax(1)]).all()
    confused = pd.read_csv(files.most_confused_csv)
    assert len(confused) <= 5 and (confused["actual"] != confused["predicted"]).all()
    assert confused["count"].is_monotonic_decreasing
    for png in files.images():
        with Image.open(png) as img:
            assert img.format == "PNG"
    with Image.open(files.confusion_png) as img:
        # 120 class names need a big canvas to stay readable; 2 classes a small one.
        assert (min(img.size) > 2000) if n_classes == 120 else (max(img.size) < 1000)
    text = files.report.read_text()
    for png in files.images():
        assert f"]({png.name})" in text
    assert "TTA gain: +1.00 accuracy points: 3 images right that the centre crop got" in text
    assert ("10 weakest classes" in text) == (n_classes > 20)
    assert files.grad_cam_png in files.images()
    with Image.open(files.grad_cam_png) as img:  # 4 top losses, two to a row of 6 panels
        assert img.size[0] > 1.5 * img.size[1]


@pytest.mark.parametrize(
    ("gained", "lost", "p", "says"),
    [
        (0, 0, 1.0, "TTA changed no image's verdict."),
        (3, 1, 0.625, "(exact McNemar p = 0.62): a split that chance alone often gives."),
        (12, 0, 0.00049, "(exact McNemar p = 0.00049)."),
    ],
)
def test_the_tta_gain_says_how_many_images_changed_and_how_likely_by_chance(
    gained: int, lost: int, p: float, says: str
):
    line = tta_gain_line({"tta_gain": (gained - lost) / 200, "tta_images_gained": gained,
                          "tta_images_lost": lost, "tta_gain_p": p})  # fmt: skip
    assert line.startswith(f"TTA gain: {(gained - lost) / 2:+.2f} accuracy points")
    assert line.endswith(says)
