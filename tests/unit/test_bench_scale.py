"""The scale benchmark (bench/scale.py): its generated photo set, disk count and targets."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import scale  # noqa: E402


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_scale_set_is_deterministic_and_any_prefix_is_the_same(
    shared_data: Path, tmp_path: Path
) -> None:
    full = scale.scale_set(tmp_path / "a", 6, seed=3, data=shared_data)
    assert full.name == "scale-s3-6"
    a = _files(full)
    assert len(a) == 6
    # An image depends on (seed, index) only, not on how the work is split between processes.
    paths = scale.variant_paths(shared_data, 3, 6)
    scale._make_images((paths[4:], 4, 3, tmp_path / "b"))
    scale._make_images((paths[:4], 0, 3, tmp_path / "b"))
    assert _files(tmp_path / "b") == a
    prefix = _files(scale.scale_set(tmp_path / "c", 3, seed=3, data=shared_data))
    assert len(prefix) == 3 and prefix.items() <= a.items()
    other = _files(scale.scale_set(tmp_path / "d", 6, seed=4, data=shared_data))
    assert set(other.values()).isdisjoint(a.values())
    # Real JPEGs of varied sizes, in <split>/<class>/ folders of the dogscats layout.
    for rel in a:
        split, label, _ = rel.split("/")
        assert split in ("train", "valid") and label in ("cats", "dogs")
        with Image.open(full / rel) as img:
            assert img.format == "JPEG" and 160 <= max(img.size) <= 512

    # The quarter the benchmark also runs: the same first images, hardlinked from the bigger
    # set beside it (no new bytes), and kept for the next run.
    quarter = scale.scale_set(tmp_path / "a", 3, seed=3, data=shared_data)
    assert quarter != full and _files(quarter) == prefix
    assert all(p.stat().st_nlink == 2 for p in quarter.rglob("*.jpg"))
    inodes = {p: p.stat().st_ino for p in full.rglob("*.jpg")}
    assert scale.scale_set(tmp_path / "a", 6, seed=3, data=shared_data) == full
    assert {p: p.stat().st_ino for p in full.rglob("*.jpg")} == inodes


def test_du_counts_each_inode_once_in_the_first_folder_holding_it(tmp_path: Path) -> None:
    out, work, cache = (tmp_path / name for name in ("outputs", "data", "cache"))
    for folder in (out, work, cache):
        folder.mkdir()
    (cache / "photo").write_bytes(b"x" * 100)
    os.link(cache / "photo", work / "photo")
    (cache / "features").write_bytes(b"f" * 40)
    os.link(cache / "features", out / "features")
    own = [folder.stat().st_size for folder in (out, work, cache)]
    assert scale.du(work, cache) == [own[1] + 100, own[2] + 40]
    # As the benchmark counts data: outputs/ first, so the feature file's object is not data.
    assert scale.du(out, work, cache) == [own[0] + 40, own[1] + 100, own[2]]


def test_compare_checks_the_issue_targets() -> None:
    def record(s_per_1k: float, rss: float, per_source: float, noop: float, audit: float) -> dict:
        stages = {s: {"s_per_1k": s_per_1k, "peak_rss_mb": rss} for s in scale.TIMED}
        stages["precompute"]["wall_s"], stages["audit"]["wall_s"] = 100.0, audit
        disk = {"data_and_cache_per_source": per_source}
        record = {"stages": stages, "disk": disk, "images": 50_000 if s_per_1k > 10 else 12_500}
        return record | {"dvc_repro_noop": {"wall_s": noop, "reran": []}}

    met = scale.compare(record(10, 1000, 1.0, 5, 9), record(11, 1400, 1.02, 20, 8))
    assert met["audit_share_of_precompute"] == {"quarter": 0.09, "full": 0.08}
    assert met["ratios"]["fetch"] == {"s_per_1k_ratio": 1.1, "peak_rss_ratio": 1.4}
    met = met["targets_met"]
    assert all(met.values()) and len(met) == 2 * len(scale.TIMED) + 5
    missed = scale.compare(record(10, 1000, 1.0, 5, 9), record(12, 1600, 2.0, 40, 11))
    missed = missed["targets_met"]
    assert not any(v for k, v in missed.items() if not k.startswith("quarter"))
    # A size below 12,500 images leaves the audit share unchecked (imports dominate there).
    small = record(10, 1000, 1.0, 5, 50) | {"images": 3_125}
    assert not any(
        "quarter audit" in k for k in scale.compare(small, record(11, 1, 1, 1, 1))["targets_met"]
    )
    # A stage that did not run at the full size fails its targets rather than passing them.
    failed = record(11, 1400, 1.02, 20, 8)
    del failed["stages"]["train_head"]
    assert not scale.compare(record(10, 1000, 1.0, 5, 9), failed)["targets_met"][
        "train_head s_per_1k_ratio <= 1.15"
    ]
