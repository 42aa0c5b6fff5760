"""TTA views are fixed and deterministic, view 0 is the eval transform, averaging is exact."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from real_config import default_runtime

from visiontune.config import TtaParams
from visiontune.data.transforms import DataConfig, PixelNormalize, create_eval_transform
from visiontune.evaluate.tta import (
    _CORNERS,
    MAX_AUGMENT,
    TtaDataset,
    TtaView,
    ViewMaker,
    average_views,
    predict_views,
    tta_views,
)

CFG = DataConfig(image_size=32, mean=(0.5,) * 3, std=(0.5,) * 3, interpolation="nearest",
                 crop_pct=1.0)  # fmt: skip


def test_views_are_a_fixed_order_of_distinct_views():
    assert tta_views(0) == (TtaView(),)
    # n_augment=1 is the mirror, 5 is FiveCrop + mirror, 9 is TenCrop; zoomed views last.
    assert [v.name for v in tta_views(5)] == [
        "crop_center",
        "crop_center_flip",
        "crop_top_left",
        "crop_top_right",
        "crop_bottom_left",
        "crop_bottom_right",
    ]
    ten = tta_views(9)
    assert {(v.position, v.flip) for v in ten} == {
        (p, f) for p in ("center", *_CORNERS) for f in (False, True)
    }
    assert not any(v.zoom for v in ten)
    every = tta_views(MAX_AUGMENT)
    assert len(set(every)) == MAX_AUGMENT + 1
    # params.yaml accepts every view there is, and no more.
    assert _bounds(TtaParams, "n_augment") == {"ge": 0, "le": MAX_AUGMENT}
    with pytest.raises(ValueError, match="n_augment"):
        tta_views(MAX_AUGMENT + 1)


def test_a_model_not_trained_on_mirrors_gets_no_mirrored_views():
    """Without mirrors the same order minus the mirrored views: n_augment 1 is the plain crop."""
    assert tta_views(1, mirror=False) == (TtaView(),)
    assert [v.name for v in tta_views(9, mirror=False)] == [
        "crop_center",
        *(f"crop_{p}" for p in _CORNERS),
    ]
    assert tta_views(MAX_AUGMENT, mirror=False) == tuple(
        v for v in tta_views(MAX_AUGMENT) if not v.flip
    )


def test_view_zero_is_the_eval_transform_and_views_are_deterministic(dogscats: Path):
    cfg = DataConfig(image_size=64, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                     interpolation="bicubic", crop_pct=0.875)  # fmt: skip
    img = Image.open(dogscats / "valid" / "cats" / "cat.4001.jpg").convert("RGB")
    maker = ViewMaker(cfg, tta_views(MAX_AUGMENT), zoom=1.15)
    views = maker(img)
    assert views.shape == (MAX_AUGMENT + 1, 3, 64, 64)
    assert views.dtype == torch.uint8  # pixels: the model normalises
    expected = create_eval_transform(cfg)(img)
    assert torch.equal(views[0], expected)
    flip = [v.name for v in tta_views(MAX_AUGMENT)].index("crop_center_flip")
    assert torch.equal(views[flip], expected.flip(-1))
    assert torch.equal(maker(img), views)
    flat = PixelNormalize.from_config(cfg)(views).flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(len(flat)) * 1e9
    assert distances.min() > 1.0  # no two views are the same picture


class LeftMinusRight(torch.nn.Module):
    """Logits (d, 0, -d) with d = mean of the left half minus the right half: flip negates d.

    It takes pixels and normalises them with CFG first, as an ImageClassifier does.
    """

    def __init__(self) -> None:
        super().__init__()
        self.normalize = PixelNormalize.from_config(CFG)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        x = self.normalize(pixels)
        half = x.shape[-1] // 2
        d = x[:, :, :, :half].mean(dim=(1, 2, 3)) - x[:, :, :, half:].mean(dim=(1, 2, 3))
        return torch.stack([d, torch.zeros_like(d), -d], dim=1)


def _split_image(path: Path, left: int) -> Path:
    array = np.zeros((64, 64, 3), dtype=np.uint8)
    array[:, :32] = left
    Image.fromarray(array).save(path)
    return path


def test_tta_probabilities_are_the_mean_of_per_view_softmax(tmp_path: Path):
    lefts = [255, 0, 127, 255, 51]
    paths = [_split_image(tmp_path / f"{i}.png", v) for i, v in enumerate(lefts)]
    dataset = TtaDataset(paths, [0, 2, 1, 0, 1], ViewMaker(CFG, (TtaView(), TtaView(flip=True))))
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)
    runtime = default_runtime(device="cpu", precision="fp32", num_workers=0)
    out = predict_views(LeftMinusRight(), loader, runtime)

    # Normalised pixels are v/127.5 - 1, the right half is -1: d = left/127.5.
    d = torch.tensor(lefts, dtype=torch.float32) / 127.5
    plain = torch.stack([d, torch.zeros_like(d), -d], 1).softmax(1)
    flipped = plain.flip(1)
    torch.testing.assert_close(out.probs[:, 0], plain)
    torch.testing.assert_close(out.probs[:, 1], flipped)
    torch.testing.assert_close(average_views(out.probs), (plain + flipped) / 2)
    # Softmax-then-mean, not mean-of-logits (which would be uniform here).
    assert average_views(out.probs)[0, 1] < 1 / 3 - 0.05
    torch.testing.assert_close(average_views(out.probs).sum(1), torch.ones(len(lefts)))
    assert out.labels.tolist() == [0, 2, 1, 0, 1]
    assert out.errors == [""] * len(lefts)


def test_unreadable_images_raise_or_are_reported(tmp_path: Path):
    good = _split_image(tmp_path / "good.png", 200)
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    maker = ViewMaker(CFG, tta_views(2))
    with pytest.raises(ValueError, match="empty file"):
        TtaDataset([empty], None, maker)[0]
    dataset = TtaDataset([empty, good, text], None, maker, skip_unreadable=True)
    runtime = default_runtime(device="cpu", precision="fp32", num_workers=0)
    out = predict_views(LeftMinusRight(), torch.utils.data.DataLoader(dataset, 2), runtime)
    assert out.errors[1] == ""
    assert "empty" in out.errors[0] and "not an image" in out.errors[2]
    assert out.probs.shape == (3, 3, 3)


def _bounds(section: type, name: str) -> dict[str, float]:
    """The numeric bounds pydantic enforces on a config field."""
    found: dict[str, float] = {}
    for item in section.model_fields[name].metadata:
        found.update({k: getattr(item, k) for k in ("ge", "le") if hasattr(item, k)})
    return found
