"""The nasty-input corpus (tests/data/datagen.py) past fetch: every accepted file goes through
real DataLoader workers (train and eval transforms) without crashing one, and a file that
breaks after fetch is a clear error naming it, not a dead worker."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from data.datagen import NASTY, NASTY_MAX_PIXELS, write_jpeg
from real_config import default_section

from visiontune.config import AugmentParams, DataParams
from visiontune.data.dataset import ImageDataset, create_loader
from visiontune.data.images import UnreadableImageError
from visiontune.data.manifest import read_manifest, read_table
from visiontune.data.prepare import prepare_dataset
from visiontune.data.transforms import DataConfig, create_eval_transform, create_train_transform
from visiontune.locations import Locator
from visiontune.runtime import Runtime

CONFIG = DataConfig(
    image_size=32, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bilinear",
    crop_pct=0.875,
)  # fmt: skip
RUNTIME = Runtime(
    device=torch.device("cpu"), amp_dtype=None, channels_last=False, num_workers=2,
    pin_memory=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fetch on a folder source: the whole corpus as one class, plus a normal class."""
    root = tmp_path_factory.mktemp("corpus")
    source = root / "source"
    for name, (writer, _) in NASTY.items():
        (source / "nasty").mkdir(parents=True, exist_ok=True)
        writer(source / "nasty" / name)
    for i in range(3):
        write_jpeg(source / "plain" / f"p{i}.jpg", seed=500 + i)
    out = root / "prepared"
    out.mkdir()
    params = default_section(DataParams, source=str(source), max_image_pixels=NASTY_MAX_PIXELS)
    here = Locator.for_stage(root, None)
    prepare_dataset(params, out, root / "downloads", here, seed=0, progress=False)
    return out


def _loader(prepared: Path, transform, paths=None) -> torch.utils.data.DataLoader:
    manifest = read_manifest(prepared / "manifest.csv")
    classes = sorted(set(manifest["label"]))
    paths = paths or [str(prepared / p) for p in manifest["path"]]
    labels = [classes.index(label) for label in manifest["label"]][: len(paths)]
    dataset = ImageDataset(paths, labels, transform, min_size=CONFIG.image_size)
    return create_loader(dataset, 4, RUNTIME, shuffle=True, seed=0)


def test_fetch_sorts_the_corpus_into_accepted_and_rejected(prepared: Path) -> None:
    manifest = read_manifest(prepared / "manifest.csv")
    rejects = read_table(prepared / "rejects.csv", ("path", "reason"))
    accepted = {Path(p).name for p in manifest["path"]}
    reasons = dict(zip([Path(p).name for p in rejects["path"]], rejects["reason"], strict=True))
    for name, (_, expected) in NASTY.items():
        if expected is None:
            assert name in accepted, (name, reasons.get(name))
        else:
            assert expected in reasons[name], (name, reasons.get(name))


@pytest.mark.parametrize("kind", ["eval", "train"])
def test_every_accepted_file_goes_through_dataloader_workers(prepared: Path, kind: str) -> None:
    transform = (
        create_eval_transform(CONFIG)
        if kind == "eval"
        else create_train_transform(
            CONFIG, default_section(AugmentParams, rotate_deg=30.0, max_zoom=1.5, flip=True)
        )
    )
    loader = _loader(prepared, transform)
    seen = []
    for _ in range(2):  # two epochs on the same persistent workers
        for images, labels, indices in loader:
            assert images.shape[1:] == (3, 32, 32) and images.dtype == torch.uint8
            assert torch.isfinite(images).all() and (labels >= 0).all()
            seen += indices.tolist()
    assert sorted(seen) == sorted(list(range(len(loader.dataset))) * 2)


def test_a_file_broken_after_fetch_is_a_clear_error_not_a_dead_worker(
    prepared: Path, tmp_path: Path
) -> None:
    manifest = read_manifest(prepared / "manifest.csv")
    paths = [str(prepared / p) for p in manifest["path"]]
    broken = tmp_path / "broken.jpg"
    shutil.copyfile(paths[0], broken)
    broken.write_bytes(broken.read_bytes()[:100])  # truncated since it was fetched
    loader = _loader(prepared, create_eval_transform(CONFIG), [*paths[1:], str(broken)])
    with pytest.raises(Exception, match=r"broken\.jpg") as failure:
        list(loader)
    # torch re-raises a worker's exception in the main process (as RuntimeError when the
    # type cannot be rebuilt from its message), with the reason and the file: no hang.
    assert "re-run the fetch stage" in str(failure.value)
    assert isinstance(failure.value, UnreadableImageError) or (
        isinstance(failure.value, RuntimeError) and "UnreadableImageError" in str(failure.value)
    )
