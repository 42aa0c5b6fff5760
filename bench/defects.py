"""A far-domain benchmark set made from the shared photos: which defect does this photo have?

Five classes (`clean`, `scratch`, `stain`, `noise`, `blur`) that are no ImageNet class:
each image is a random square crop of one of the `../shared/data` photos, with one kind of
synthetic defect painted into a random region. Every source photo is used once, so the
photo's subject says nothing about the class; a classifier must look at the texture, as
for product, surface or X-ray defects. Deterministic for a given seed and Pillow/NumPy.

    python bench/defects.py OUT_DIR [--per-class 200] [--seed 0]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SIZE = 256
CLASSES = ("clean", "scratch", "stain", "noise", "blur")


def _region(rng: np.random.Generator) -> tuple[int, int, int, int]:
    """A random box covering 25-50 % of the side, anywhere in the image."""
    side = int(rng.integers(SIZE // 4, SIZE // 2))
    left, top = (int(v) for v in rng.integers(0, SIZE - side, size=2))
    return left, top, left + side, top + side


def _scratch(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 4))):  # 1-3 thin bright or dark strokes
        x0, y0, x1, y1 = (int(v) for v in rng.integers(0, SIZE, size=4))
        shade = int(rng.choice([rng.integers(0, 40), rng.integers(215, 256)]))
        draw.line([(x0, y0), (x1, y1)], fill=(shade,) * 3, width=int(rng.integers(2, 4)))
    return img


def _stain(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    overlay = Image.new("RGB", img.size, tuple(int(v) for v in rng.integers(60, 200, size=3)))
    mask = Image.new("L", img.size, 0)
    ImageDraw.Draw(mask).ellipse(_region(rng), fill=int(rng.integers(110, 200)))
    return Image.composite(overlay, img, mask.filter(ImageFilter.GaussianBlur(6)))


def _noise(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    pixels = np.asarray(img).astype(np.int16)
    left, top, right, bottom = _region(rng)
    grain = rng.normal(0, rng.uniform(25, 45), size=(bottom - top, right - left, 3))
    pixels[top:bottom, left:right] += grain.astype(np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def _blur(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    box = _region(rng)
    img.paste(img.crop(box).filter(ImageFilter.GaussianBlur(rng.uniform(3, 6))), box[:2])
    return img


DEFECTS: dict[str, Callable[[Image.Image, np.random.Generator], Image.Image]] = {
    "clean": lambda img, _rng: img,
    "scratch": _scratch,
    "stain": _stain,
    "noise": _noise,
    "blur": _blur,
}


def source_photos(shared_data: Path = SHARED_DATA) -> list[Path]:
    """Every JPEG of the shared photo sets, in a fixed order."""
    return sorted(
        [*(shared_data / "dogscats").rglob("*.jpg"), *(shared_data / "dogbreeds").rglob("*.jpg")]
    )


def make_defects(
    out: Path, per_class: int = 200, seed: int = 0, shared_data: Path = SHARED_DATA
) -> Path:
    """Write `out/<class>/<n>.jpg`, `per_class` images per class; returns `out`."""
    photos = source_photos(shared_data)
    if len(photos) < per_class * len(CLASSES):
        raise ValueError(f"need {per_class * len(CLASSES)} photos, {shared_data} has {len(photos)}")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(len(photos))[: per_class * len(CLASSES)]
    for i, photo_index in enumerate(chosen):
        name = CLASSES[i % len(CLASSES)]
        with Image.open(photos[photo_index]) as photo:
            photo = photo.convert("RGB")
            side = min(photo.size)
            crop = int(side * rng.uniform(0.6, 1.0))
            left = int(rng.integers(0, photo.width - crop + 1))
            top = int(rng.integers(0, photo.height - crop + 1))
            img = photo.crop((left, top, left + crop, top + crop)).resize((SIZE, SIZE))
        img = DEFECTS[name](img, rng)
        (out / name).mkdir(parents=True, exist_ok=True)
        img.save(out / name / f"{i:05d}.jpg", quality=92)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_defects(args.out, args.per_class, args.seed)


if __name__ == "__main__":
    main()
