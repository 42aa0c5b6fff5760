"""inspect_image / open_rgb on a corpus of awkward files generated at test time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from visiontune.data.images import UnreadableImageError, inspect_image, open_rgb


def test_every_nasty_file_is_accepted_or_rejected_with_its_reason(
    nasty_dir: Path, nasty_expected: dict[str, str | None], nasty_max_pixels: int
) -> None:
    for name, expected in nasty_expected.items():
        reason = inspect_image(nasty_dir / name, max_pixels=nasty_max_pixels)
        if expected is None:
            assert reason is None, f"{name} should be accepted, got {reason!r}"
            image = open_rgb(nasty_dir / name)
            assert image.mode == "RGB" and min(image.size) >= 1, name
        else:
            assert reason is not None and expected in reason, f"{name}: {reason!r}"
            if name != "bomb.png":  # a valid image, only over the (test's) pixel limit
                with pytest.raises(UnreadableImageError):
                    open_rgb(nasty_dir / name)


def test_unreadable_error_names_the_file_and_the_reason(nasty_dir: Path) -> None:
    with pytest.raises(UnreadableImageError) as info:
        open_rgb(nasty_dir / "truncated.jpg")
    assert info.value.path.endswith("truncated.jpg")
    assert "truncated" in info.value.reason and "truncated.jpg" in str(info.value)
    assert isinstance(info.value, ValueError)


def test_missing_file_and_directory_are_reasons_not_crashes(tmp_path: Path) -> None:
    assert inspect_image(tmp_path / "nope.jpg") == "file not found"
    assert "directory" in (inspect_image(tmp_path) or "")


def test_exif_orientation_is_applied(nasty_dir: Path) -> None:
    raw = Image.open(nasty_dir / "exif_rotated.jpg")
    assert raw.size == (60, 20)
    assert open_rgb(nasty_dir / "exif_rotated.jpg").size == (20, 60)


def test_alpha_is_composited_on_white(nasty_dir: Path) -> None:
    pixels = np.asarray(open_rgb(nasty_dir / "alpha.png"))
    assert pixels.min() == 255  # fully transparent → the white background


def test_sixteen_bit_is_rescaled_not_clipped(nasty_dir: Path) -> None:
    source = np.asarray(Image.open(nasty_dir / "sixteen_bit.png")).astype(np.float64)
    pixels = np.asarray(open_rgb(nasty_dir / "sixteen_bit.png"))[..., 0].astype(np.float64)
    np.testing.assert_allclose(pixels, np.rint(source / 257), atol=1)
    assert pixels.max() > 200 and (pixels == 255).mean() < 0.01  # a clip would saturate


def test_cmyk_and_palette_and_animated_gif_become_rgb_of_the_first_frame(
    nasty_dir: Path, make_photo
) -> None:
    gif = open_rgb(nasty_dir / "animated.gif")
    assert gif.size == (48, 32) and gif.mode == "RGB"
    first = np.asarray(make_photo(seed=10).convert("P").convert("RGB"), dtype=np.int16)
    assert np.abs(np.asarray(gif, dtype=np.int16) - first).mean() < 2
    cmyk = np.asarray(open_rgb(nasty_dir / "cmyk.jpg"), dtype=np.int16)
    expected = np.asarray(make_photo(seed=13), dtype=np.int16)
    assert np.abs(cmyk - expected).mean() < 12  # JPEG loss only, colours not inverted


def test_jpeg_draft_keeps_the_short_side_at_least_min_size(nasty_dir: Path) -> None:
    path = nasty_dir / "large.jpg"  # 3000 x 2000
    assert open_rgb(path).size == (3000, 2000)
    reduced = open_rgb(path, min_size=224)
    assert reduced.size == (375, 250)  # 1/8 scale: the largest that keeps >= 224
    assert min(open_rgb(path, min_size=600).size) == 1000  # 1/2 scale
    assert open_rgb(nasty_dir / "alpha.png", min_size=8).size == (48, 32)  # not a JPEG


def test_default_pixel_limit_is_pillows(nasty_dir: Path) -> None:
    assert inspect_image(nasty_dir / "bomb.png") is None  # 10 MP < Pillow's 89 MP default
