"""Eval and training transforms (uint8 pixels, crop geometry) and the batch normalisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from real_config import default_section
from torchvision.transforms import v2
from torchvision.transforms.v2.functional import pil_to_tensor

from visiontune.config import AugmentParams
from visiontune.data.transforms import (
    DataConfig,
    PixelNormalize,
    RandomZoomCrop,
    create_eval_transform,
    create_train_transform,
    train_min_size,
)

CFG = DataConfig(
    image_size=64, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic", crop_pct=0.8
)


def test_data_config_round_trips_through_json() -> None:
    assert DataConfig.from_dict(json.loads(json.dumps(CFG.to_dict()))) == CFG
    assert CFG.resize_size == 80
    assert train_min_size(CFG, default_section(AugmentParams, max_zoom=1.5)) == 96


def test_eval_transform_yields_pixels_that_the_model_normalises_with_the_config() -> None:
    white = create_eval_transform(CFG)(Image.new("RGB", (300, 200), (255, 255, 255)))
    assert white.shape == (3, 64, 64) and white.dtype == torch.uint8
    assert bool((white == 255).all())
    normalised = PixelNormalize.from_config(CFG)(white[None])
    assert normalised.dtype == torch.float32
    assert torch.allclose(normalised, torch.ones_like(normalised))  # (1 - 0.5) / 0.5
    imagenet = DataConfig(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bilinear", 1.0)
    black = create_eval_transform(imagenet)(Image.new("RGB", (64, 64)))
    normalised = PixelNormalize.from_config(imagenet)(black[None])[0]
    assert torch.allclose(normalised[0], torch.full((64, 64), -0.485 / 0.229))


def test_eval_transform_centre_crops_after_resizing_the_short_side() -> None:
    # 400x200 → short side 80 → 160x80 → the centre 64x64 excludes the outer quarters.
    image = Image.new("RGB", (400, 200), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 100, 200))
    image.paste((255, 0, 0), (300, 0, 400, 200))
    out = create_eval_transform(CFG)(image)
    assert bool((out[0] == 0).all())  # no red left
    assert bool((out[2] == 255).all())


def test_train_transform_is_random_but_seedable() -> None:
    image = Image.effect_mandelbrot((120, 90), (-2, -1.2, 1, 1.2), 50).convert("RGB")
    transform = create_train_transform(
        CFG, default_section(AugmentParams, rotate_deg=10, max_zoom=1.3, flip=True)
    )
    torch.manual_seed(0)
    first = transform(image)
    torch.manual_seed(0)
    assert torch.equal(transform(image), first)
    assert first.shape == (3, 64, 64)
    assert not torch.equal(transform(image), first)


def test_zoom_crop_without_zoom_keeps_the_whole_short_side() -> None:
    # A vertical gradient: a crop spanning the full height keeps both extremes.
    column = Image.linear_gradient("L").resize((1, 200))
    image = Image.merge("RGB", [column.resize((300, 200))] * 3)
    crop = RandomZoomCrop(50, max_zoom=1.0, ratio=(1.0, 1.0))
    for _ in range(5):
        out = pil_to_tensor(crop(image))[0]
        assert out[0].max() < 10 and out[-1].min() > 245


def test_zoom_crop_zooms_at_most_max_zoom() -> None:
    column = Image.linear_gradient("L").resize((1, 200))
    image = Image.merge("RGB", [column.resize((200, 200))] * 3)
    crop = RandomZoomCrop(50, max_zoom=2.0, ratio=(1.0, 1.0))
    torch.manual_seed(1)
    spans = []
    for _ in range(30):
        out = pil_to_tensor(crop(image))[0].float()
        spans.append(float(out[-1].mean() - out[0].mean()))
    # The crop height is between 1/2 and all of the image, so is the grey-level span.
    assert min(spans) > 255 / 2 * 0.9 and max(spans) <= 256
    assert max(spans) - min(spans) > 30  # the zoom really varies


@pytest.mark.parametrize("degrees", [0.0, 10.0])
def test_zoom_crop_turns_the_crop_by_at_most_degrees(degrees: float) -> None:
    """A photo-sized image with a horizontal edge: the edge in the crop tilts by the
    drawn angle, never more than `degrees`, and it really varies."""
    image = Image.new("RGB", (400, 300))
    image.paste((255, 255, 255), (0, 150, 400, 300))
    crop = RandomZoomCrop(64, max_zoom=3.0, ratio=(1.0, 1.0), degrees=degrees)
    torch.manual_seed(3)
    tilts = []
    for _ in range(40):
        out = pil_to_tensor(crop(image))[0].float()
        # The edge's row in the columns a quarter from each side (sub-pixel, from the mean).
        rows = [float((out[:, c] > 127).logical_not().sum()) for c in (16, 48)]
        if all(4 < r < 60 for r in rows):  # the edge crosses both columns inside the crop
            tilts.append(math.degrees(math.atan2(rows[0] - rows[1], 32)))
    assert len(tilts) >= 10
    if degrees == 0:
        assert max(abs(t) for t in tilts) < 1.5
    else:
        assert max(abs(t) for t in tilts) <= degrees + 1.5
        assert max(tilts) > degrees / 3 and min(tilts) < -degrees / 3


def test_zoom_crop_shrinks_large_photos_before_resampling() -> None:
    """A fine stripe pattern far above the output scale averages to grey (antialiased)
    instead of aliasing into stripes, as a one-step affine resampling would."""
    stripes = np.tile(np.array([0, 255], dtype=np.uint8).repeat(2), 400)[:1600]
    image = Image.fromarray(np.stack([np.tile(stripes, (1200, 1))] * 3, axis=-1))
    crop = RandomZoomCrop(64, max_zoom=1.0, ratio=(1.0, 1.0), degrees=5.0)
    torch.manual_seed(0)
    out = pil_to_tensor(crop(image)).float()
    assert out[:, 8:-8, 8:-8].std() < 20  # about 127 everywhere inside the black corners


def test_unknown_interpolation_is_named() -> None:
    bad = DataConfig(64, (0.5,) * 3, (0.5,) * 3, "cubic-ish", 0.9)
    with pytest.raises(ValueError, match=r"cubic-ish.*bilinear"):
        create_eval_transform(bad)


@pytest.mark.parametrize("name", ["cat.4001.jpg", "dog.4002.jpg"])
@pytest.mark.parametrize("portrait", [False, True])
def test_eval_transform_matches_pillows_resize_then_centre_crop(dogscats, name, portrait) -> None:
    """The tensor resize gives Pillow's pixels up to resampling round-off (the features
    of a photo do not depend on which of the two resized it)."""
    from visiontune.data.images import open_rgb

    folder = dogscats / "valid" / ("cats" if name.startswith("cat") else "dogs")
    image = open_rgb(folder / name)
    if portrait:
        image = image.transpose(Image.Transpose.ROTATE_90)
    cfg = DataConfig(87, (0.5,) * 3, (0.5,) * 3, "bicubic", 0.87)
    pil_reference = v2.Compose(
        [v2.Resize(100, interpolation=v2.InterpolationMode.BICUBIC), v2.CenterCrop(87)]
    )(image)
    out = create_eval_transform(cfg)(image)
    assert out.dtype == torch.uint8 and out.shape == (3, 87, 87)
    diff = (out.float() - pil_to_tensor(pil_reference).float()).abs()
    assert diff.mean() < 0.5 and diff.max() <= 16


def test_pixel_normalisation_matches_torchvision() -> None:
    image = Image.effect_mandelbrot((40, 30), (-2, -1.2, 1, 1.2), 50).convert("RGB")
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    reference = v2.Compose(
        [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    )
    batch = torch.stack([pil_to_tensor(image), pil_to_tensor(image.rotate(180))])
    expected = torch.stack([reference(image), reference(image.rotate(180))])
    assert torch.allclose(PixelNormalize(mean, std)(batch), expected, atol=1e-5)


def test_pixel_normalisation_keeps_the_layout_and_leaves_its_input_alone() -> None:
    normalize = PixelNormalize((0.5,) * 3, (0.25,) * 3)
    pixels = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    channels_last = pixels.contiguous(memory_format=torch.channels_last)
    out = normalize(channels_last)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, normalize(pixels))  # the same numbers in either layout
    as_float = pixels.float()
    normalize(as_float)
    assert torch.equal(as_float, pixels.float())  # not normalised in place
    assert normalize.state_dict() == {}  # mean/std live in the data config, not the weights
