"""open_pixels: JPEGs straight into tensors where that gives Pillow's pixels exactly, and
open_rgb's decode, checks and errors for everything else."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from data.datagen import NASTY, photo, write_jpeg
from PIL import Image
from real_config import default_section
from torchvision.transforms.v2 import functional as F

from visiontune.config import AugmentParams
from visiontune.data.dataset import seeded_rngs
from visiontune.data.images import UnreadableImageError, open_rgb
from visiontune.data.pixels import _is_direct_jpeg, decode_pixels, open_pixels
from visiontune.data.transforms import DataConfig, create_eval_transform, create_train_transform
from visiontune.evaluate.tta import ViewMaker, tta_views


def pillow_pixels(path: Path, min_size: int | None = None) -> torch.Tensor:
    return F.pil_to_tensor(open_rgb(path, min_size=min_size))


def test_real_photos_decode_directly_to_pillows_pixels(dogscats: Path) -> None:
    photos = sorted((dogscats / "train" / "cats").glob("*.jpg"))[:12]
    photos += sorted((dogscats / "valid" / "dogs").glob("*.jpg"))[:12]
    for path in photos:
        assert _is_direct_jpeg(path.read_bytes(), 256), path  # the direct decode ran
        pixels = open_pixels(path, min_size=256)
        assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3
        assert torch.equal(pixels, pillow_pixels(path, 256)), path


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_applied_as_pillow_does(tmp_path: Path, orientation) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"o{orientation}.jpg"
    photo(61, 47, seed=orientation).save(path, "JPEG", quality=95, exif=exif.tobytes())
    assert _is_direct_jpeg(path.read_bytes(), None)
    pixels = open_pixels(path)
    assert pixels.shape[1:] == ((47, 61) if orientation <= 4 else (61, 47))
    assert torch.equal(pixels, pillow_pixels(path))


@pytest.mark.parametrize(
    "mode, options",
    [("L", {}), ("RGB", {"progressive": True}), ("RGB", {"subsampling": 0})],
    ids=["grayscale", "progressive", "4:4:4"],
)
def test_other_jpeg_kinds_decode_directly_to_pillows_pixels(tmp_path, mode, options) -> None:
    path = tmp_path / "kind.jpg"
    photo(50, 30, seed=3).convert(mode).save(path, "JPEG", **options)
    assert _is_direct_jpeg(path.read_bytes(), None)
    assert torch.equal(open_pixels(path), pillow_pixels(path))


def test_a_photo_big_enough_for_a_reduced_decode_goes_through_pillows_draft(tmp_path) -> None:
    path = write_jpeg(tmp_path / "big.jpg", size=(600, 400))
    assert not _is_direct_jpeg(path.read_bytes(), 100)  # 400 // 100 = 4: a quarter-size decode
    pixels = open_pixels(path, min_size=100)
    assert pixels.shape == (3, 100, 150)
    assert torch.equal(pixels, pillow_pixels(path, 100))
    assert _is_direct_jpeg(path.read_bytes(), 201)  # 400 < 2 × 201: no reduction
    assert open_pixels(path, min_size=201).shape == (3, 400, 600)


def test_every_accepted_corpus_file_gives_pillows_pixels(tmp_path: Path) -> None:
    accepted = [name for name, (_, expected) in NASTY.items() if expected is None]
    direct = set()
    for name in accepted:
        path = tmp_path / name
        NASTY[name][0](path)
        if _is_direct_jpeg(path.read_bytes(), 32):
            direct.add(name)
        assert torch.equal(open_pixels(path, 32), pillow_pixels(path, 32)), name
    # CMYK and the 6 MP photo (a 1/8 decode) are Pillow's; other formats are not JPEGs.
    assert direct == {"exif_rotated.jpg", "çà et là – ünïcode.jpg"}


def test_bytes_decode_to_the_files_pixels_and_errors(tmp_path: Path, dogscats: Path) -> None:
    """What a served model gets (the file's bytes) decodes as `visiontune predict` decodes
    the file: EXIF orientation, alpha, CMYK, 16-bit, reduced JPEG decodes, the errors."""
    photos = sorted((dogscats / "valid" / "cats").glob("*.jpg"))[:3]
    for name, (writer, _) in NASTY.items():
        writer(tmp_path / name)
    for path in [*photos, *sorted(tmp_path.iterdir())]:
        for min_size in (None, 32):
            try:
                expected = open_pixels(path, min_size)
            except UnreadableImageError as exc:
                with pytest.raises(UnreadableImageError) as ours:
                    decode_pixels(path.read_bytes(), min_size)
                assert ours.value.reason == exc.reason, path.name
                continue
            assert torch.equal(decode_pixels(path.read_bytes(), min_size), expected), path.name


@pytest.mark.parametrize("name", ["truncated.jpg", "zero bytes.jpg", "text.jpg"])
def test_a_broken_file_gets_open_rgbs_error(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    NASTY[name][0](path)
    with pytest.raises(UnreadableImageError) as pillows:
        open_rgb(path)
    with pytest.raises(UnreadableImageError) as ours:
        open_pixels(path)
    assert ours.value.reason == pillows.value.reason
    with pytest.raises(UnreadableImageError, match="file not found"):
        open_pixels(tmp_path / "missing.jpg")


def test_transforms_give_the_same_pixels_from_a_tensor_as_from_a_pillow_image() -> None:
    cfg = DataConfig(32, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
    train = create_train_transform(
        cfg, default_section(AugmentParams, rotate_deg=20.0, max_zoom=1.5, flip=True)
    )
    views = ViewMaker(cfg, tta_views(4))
    # 120×80 is shrunk before the affine step; 30×20 (below the output size) is not.
    for size in ((120, 80), (30, 20)):
        image = photo(*size, seed=size[0])
        pixels = F.pil_to_tensor(image)
        assert torch.equal(create_eval_transform(cfg)(pixels), create_eval_transform(cfg)(image))
        assert torch.equal(views(pixels), views(image))
        for seed in range(5):
            with seeded_rngs(seed):
                from_tensor = train(pixels)
            with seeded_rngs(seed):
                from_image = train(image)
            assert from_tensor.shape == (3, 32, 32)
            assert torch.equal(from_tensor, from_image), (size, seed)


def test_without_torchcodec_every_photo_goes_through_pillow(dogscats: Path, monkeypatch) -> None:
    """A lent GPU machine has torch but not TorchCodec: the same pixels, from open_rgb."""
    from visiontune.data import pixels

    monkeypatch.setattr(pixels, "decode_jpeg", None)
    for path in sorted((dogscats / "valid" / "cats").glob("*.jpg"))[:4]:
        assert not _is_direct_jpeg(path.read_bytes(), 256)
        assert torch.equal(open_pixels(path, min_size=256), pillow_pixels(path, 256)), path
