"""The scale benchmark: its generated photo set (bench/scale_data.py) and helpers (scale.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from PIL import Image

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import scale  # noqa: E402
from scale_data import link_subset, make_scale_set  # noqa: E402


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.jpg"))}


def test_scale_set_is_deterministic_and_any_prefix_is_the_same(
    shared_data: Path, tmp_path: Path
) -> None:
    a = _files(make_scale_set(tmp_path / "a", 6, seed=3, shared_data=shared_data))
    b = _files(make_scale_set(tmp_path / "b", 6, seed=3, workers=2, shared_data=shared_data))
    assert a == b and len(a) == 6
    prefix = _files(make_scale_set(tmp_path / "c", 3, seed=3, shared_data=shared_data))
    assert prefix.items() <= a.items()
    other = _files(make_scale_set(tmp_path / "d", 6, seed=4, shared_data=shared_data))
    assert set(other.values()).isdisjoint(a.values())
    # Real JPEGs of varied sizes, in <split>/<class>/ folders of the dogscats layout.
    for rel in a:
        split, label, _ = rel.split("/")
        assert split in ("train", "valid") and label in ("cats", "dogs")
        with Image.open(tmp_path / "a" / rel) as img:
            assert img.format == "JPEG" and 160 <= max(img.size) <= 512

    # The quarter the benchmark also runs: the same first images, hardlinked (no new bytes).
    quarter = link_subset(tmp_path / "a", tmp_path / "q", 3, seed=3, shared_data=shared_data)
    assert _files(quarter) == prefix
    assert all(p.stat().st_nlink == 2 for p in quarter.rglob("*.jpg"))


def test_disk_bytes_counts_each_inode_once_and_leaves_out_the_excluded(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "work").mkdir()
    (tmp_path / "out").mkdir()
    (tmp_path / "cache" / "photo").write_bytes(b"x" * 100)
    os.link(tmp_path / "cache" / "photo", tmp_path / "work" / "photo")
    (tmp_path / "cache" / "features").write_bytes(b"f" * 40)
    os.link(tmp_path / "cache" / "features", tmp_path / "out" / "features")
    roots = [tmp_path / "work", tmp_path / "cache"]
    assert scale.disk_bytes(roots) == 140
    assert scale.disk_bytes(roots, exclude=[tmp_path / "out"]) == 100


def test_compare_checks_the_issue_targets() -> None:
    def record(s_per_1k: float, rss: float, per_source: float, noop: float, audit: float) -> dict:
        stages = {s: {"s_per_1k": s_per_1k, "peak_rss_mb": rss} for s in scale.TIMED}
        stages["precompute"]["wall_s"], stages["audit"]["wall_s"] = 100.0, audit
        disk = {"data_and_cache_per_source": per_source}
        record = {"stages": stages, "disk": disk, "images": 50_000 if s_per_1k > 10 else 12_500}
        return record | {"dvc_repro_noop": {"wall_s": noop, "reran": []}}

    met = scale.compare(record(10, 1000, 1.0, 5, 9), record(11, 1400, 1.02, 20, 8))
    assert met["audit_share_of_precompute"] == {"quarter": 0.09, "full": 0.08}
    met = met["targets_met"]
    assert all(met.values()) and len(met) == 2 * len(scale.TIMED) + 5
    missed = scale.compare(record(10, 1000, 1.0, 5, 9), record(12, 1600, 2.0, 40, 11))
    missed = missed["targets_met"]
    assert not any(v for k, v in missed.items() if not k.startswith("quarter"))
