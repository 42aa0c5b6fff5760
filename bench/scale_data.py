"""A large photo set made from the shared dogscats photos, for the scale benchmark.

Image `i` is a variant of photo `i mod 3000` in a seeded order (a random crop of 50-100 %
of each side, a mirror flip half the time, resized to a long side of 160-512 px, JPEG
quality 85-95) in that photo's split and class folder: `OUT/train/cats/cat.1.v003.jpg`.
Every image has its own RNG seeded by (seed, i), so the set is deterministic for a given
seed and Pillow/NumPy, whatever the number of processes, and the first n images of any
bigger set are the same.

    python bench/scale_data.py OUT_DIR [--images 50000] [--seed 0] [--workers 2]
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def source_photos(shared_data: Path = SHARED_DATA, seed: int = 0) -> list[Path]:
    """The dogscats JPEGs (`<split>/<class>/<name>.jpg`) in a seeded order, so that any
    first n images mix both classes and both splits."""
    photos = sorted((shared_data / "dogscats").glob("*/*/*.jpg"))
    return [photos[i] for i in np.random.default_rng(seed).permutation(len(photos))]


def variant_path(photo: Path, index: int, n_photos: int) -> Path:
    """`<split>/<class>/<stem>.v<k>.jpg`, relative to the output folder."""
    return Path(
        photo.parent.parent.name, photo.parent.name, f"{photo.stem}.v{index // n_photos:03d}.jpg"
    )


def make_variant(photo: Path, index: int, seed: int, out: Path) -> None:
    """Write image `index`, a seeded crop / flip / resize of `photo`."""
    rng = np.random.default_rng([seed, index])
    with Image.open(photo) as img:
        img = img.convert("RGB")
        width, height = (max(1, int(side * rng.uniform(0.5, 1.0))) for side in img.size)
        left = int(rng.integers(0, img.width - width + 1))
        top = int(rng.integers(0, img.height - height + 1))
        img = img.crop((left, top, left + width, top + height))
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    scale = int(rng.integers(160, 513)) / max(img.size)
    img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
    out.parent.mkdir(parents=True, exist_ok=True)
    img.save(out, quality=int(rng.integers(85, 96)))


def _make_range(args: tuple[list[Path], range, int, Path]) -> None:
    photos, indices, seed, out = args
    for index in indices:
        photo = photos[index % len(photos)]
        make_variant(photo, index, seed, out / variant_path(photo, index, len(photos)))


def make_scale_set(
    out: Path, images: int, seed: int = 0, workers: int = 1, shared_data: Path = SHARED_DATA
) -> Path:
    """Write images 0..`images`-1 under `out` (skipping none: `out` should be new)."""
    photos = source_photos(shared_data, seed)
    if not photos:
        raise FileNotFoundError(f"no dogscats photos under {shared_data}")
    chunk = 500
    jobs = [(photos, range(i, min(i + chunk, images)), seed, out) for i in range(0, images, chunk)]
    if workers <= 1:
        for job in jobs:
            _make_range(job)
    else:
        with ProcessPoolExecutor(max_workers=workers) as pool:
            list(pool.map(_make_range, jobs))
    return out


def link_subset(
    full: Path, out: Path, images: int, seed: int = 0, shared_data: Path = SHARED_DATA
) -> Path:
    """Images 0..`images`-1 of the set in `full`, as hardlinks under `out` (no new bytes;
    copies where links fail)."""
    photos = source_photos(shared_data, seed)
    for index in range(images):
        rel = variant_path(photos[index % len(photos)], index, len(photos))
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(full / rel, out / rel)
        except OSError:
            (out / rel).write_bytes((full / rel).read_bytes())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--images", type=int, default=50_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    make_scale_set(args.out, args.images, args.seed, args.workers)


if __name__ == "__main__":
    main()
