"""`make bench-scale`: does the data path scale? fetch → split → precompute → audit → train_head on
a generated set of 50 000 photos and on its first quarter, in the same run.

Per stage: seconds per 1 000 images at both sizes and their ratio, peak RSS and its ratio;
disk: data/prepared + .dvc/cache (each inode once, the feature file apart) per source byte;
the time of a no-op `dvc status` and `dvc repro` (which may run source_stamp only).
Writes bench/results/scale.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from project import (
    REPO_ROOT,
    deep_merge,
    git_state,
    make_project,
    portable,
    project_env,
    run_measured,
    run_pipeline,
)
from scale_data import SHARED_DATA, link_subset, make_scale_set
from summary import collect_outputs

BENCH = Path(__file__).resolve().parent
STAGES = ("source_stamp", "fetch", "split", "precompute", "audit", "train_head")
TIMED = ("fetch", "split", "precompute", "audit", "train_head")
# The issue-24 targets: same-run ratios of the full size to the quarter; issue 32's: the
# audit's wall time (process start included) against precompute's at each size.
TARGETS = {"s_per_1k_ratio": 1.15, "peak_rss_ratio": 1.5, "disk_per_source": 1.1, "noop_s": 30.0,
           "audit_share": 0.10}  # fmt: skip
AUDIT_TARGET_IMAGES = 12_500


def scale_sets(
    scratch: Path, images: int, seed: int, workers: int, shared_data: Path
) -> tuple[Path, Path]:
    """The generated set and its first quarter (hardlinks), made once and reused."""
    full = scratch / f"scale-s{seed}-{images}"
    quarter = scratch / f"scale-s{seed}-{images}-first-{images // 4}"
    if not full.is_dir():
        print(f"-- generating {images} images into {full}", flush=True)
        shutil.rmtree(full.with_suffix(".tmp"), ignore_errors=True)
        make_scale_set(full.with_suffix(".tmp"), images, seed, workers, shared_data)
        full.with_suffix(".tmp").rename(full)
    if not quarter.is_dir():
        shutil.rmtree(quarter.with_suffix(".tmp"), ignore_errors=True)
        link_subset(full, quarter.with_suffix(".tmp"), images // 4, seed, shared_data)
        quarter.with_suffix(".tmp").rename(quarter)
    return full, quarter


def disk_bytes(roots: list[Path], exclude: list[Path] = ()) -> int:
    """Bytes of the files under `roots`, each inode once (as `du`), less those whose inode
    is also under `exclude` (the feature file's cache object is a link to outputs/)."""
    skip = {(s.st_dev, s.st_ino) for root in exclude for s in _stats(root)}
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for stat in _stats(root):
            key = (stat.st_dev, stat.st_ino)
            if key not in seen and key not in skip:
                seen.add(key)
                total += stat.st_size
    return total


def _stats(root: Path) -> list[os.stat_result]:
    if root.is_file():
        return [root.lstat()]
    return [p.lstat() for p in root.rglob("*") if p.is_file() and not p.is_symlink()]


def run_size(source: Path, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """One size: the four stages measured, then disk use and DVC no-op times."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = deep_merge(params, {"data": {"source": str(source), "mirrors": {}}})
    if args.no_tracking:
        params = deep_merge(params, {"tracking": {"enabled": False}})
    project = make_project(workdir / "repo", params)
    if args.cache_type:
        subprocess.run(["dvc", "config", "cache.type", args.cache_type], cwd=project, check=True)
    print(f"== {source.name}: {source}", flush=True)
    runs = run_pipeline(project, only=STAGES)
    ok = bool(runs) and all(r.returncode == 0 for r in runs)
    images = collect_outputs(project)["prepared_images"] if ok else 0
    record: dict[str, Any] = {"source": str(source), "ok": ok, "images": images, "stages": {}}
    for run in runs:
        record["stages"][run.name] = run.to_dict() | {
            "s_per_1k": 1000 * run.wall_s / images if images else None
        }
    if not ok:
        return record
    env = project_env(project)
    dvc = shlex.quote(str(Path(sys.executable).parent / "dvc"))
    for name, command in (
        ("dvc_status", "status --with-deps train_head"),
        ("dvc_repro_noop", "repro train_head"),
    ):
        log = project / f"bench-logs/{name}.log"
        run = run_measured(name, f"{dvc} {command}", project, env, log)
        # Nothing changed: only source_stamp (always_changed) may run.
        reran = [stage for stage in TIMED if f"Running stage '{stage}'" in run.log]
        record[name] = run.to_dict() | {"log_tail": run.log[-400:], "reran": reran}
        print(f"  {name:<14} {run.wall_s:8.1f} s  rc={run.returncode}", flush=True)
    features = project / "outputs/features/features.safetensors"
    data_roots = [project / "data/prepared", project / "data/split", project / ".dvc/cache"]
    record["disk"] = {
        "source_bytes": disk_bytes([source]),
        "data_and_cache_bytes": disk_bytes(data_roots, exclude=[project / "outputs"]),
        "features_bytes": features.stat().st_size,
        "cache_type": args.cache_type or "as in .dvc/config",
    }
    disk = record["disk"]
    disk["data_and_cache_per_source"] = disk["data_and_cache_bytes"] / disk["source_bytes"]
    disk["bytes_per_image"] = disk["data_and_cache_bytes"] / images
    if args.keep:
        print(f"project copy kept at {project}")
    return record


def compare(small: Mapping[str, Any], big: Mapping[str, Any]) -> dict[str, Any]:
    """Full-size / quarter ratios per stage, and each target met or not."""
    rows: dict[str, Any] = {}
    for stage in TIMED:
        a, b = small["stages"].get(stage, {}), big["stages"].get(stage, {})
        per_1k = b.get("s_per_1k") / a["s_per_1k"] if a.get("s_per_1k") else None
        rss = b.get("peak_rss_mb") / a["peak_rss_mb"] if a.get("peak_rss_mb") else None
        rows[stage] = {"s_per_1k_ratio": per_1k, "peak_rss_ratio": rss}
    checks = {
        f"{stage} {key} <= {TARGETS[key]}": value is not None and value <= TARGETS[key]
        for stage, row in rows.items()
        for key, value in row.items()
    }
    shares: dict[str, float] = {}
    for name, record in (("quarter", small), ("full", big)):
        audit, precompute = record["stages"].get("audit"), record["stages"].get("precompute")
        if audit and precompute:
            shares[name] = audit["wall_s"] / precompute["wall_s"]
            if record.get("images", 0) >= AUDIT_TARGET_IMAGES:  # below, imports dominate
                checks[f"{name} audit <= {TARGETS['audit_share']} of precompute"] = (
                    shares[name] <= TARGETS["audit_share"]
                )
        if "disk" in record:
            per_source = record["disk"]["data_and_cache_per_source"]
            checks[f"{name} disk per source byte <= 1.1"] = per_source <= TARGETS["disk_per_source"]
    if "dvc_repro_noop" in big:
        noop = big["dvc_repro_noop"]
        checks["full no-op dvc repro <= 30 s"] = noop["wall_s"] <= 30.0 and not noop["reran"]
    return {"ratios": rows, "audit_share_of_precompute": shares, "targets_met": checks}


def markdown(record: Mapping[str, Any]) -> str:
    small, big = record["quarter"], record["full"]
    lines = [
        f"# Scale: {big['images']} vs {small['images']} images ({record['started']}, "
        f"{record['cpu_count']} cores, commit {record['git']['commit'][:10]}"
        f"{' dirty' if record['git']['dirty'] else ''})",
        "",
        "| stage | s / 1k (quarter) | s / 1k (full) | ratio | peak RSS MiB (quarter) "
        "| peak RSS MiB (full) | ratio |",
        "|---|---|---|---|---|---|---|",
    ]
    for stage in TIMED:
        a, b = small["stages"].get(stage, {}), big["stages"].get(stage, {})
        ratio = record["comparison"]["ratios"][stage]
        lines.append(
            f"| {stage} | {_num(a.get('s_per_1k'))} | {_num(b.get('s_per_1k'))} "
            f"| {_num(ratio['s_per_1k_ratio'], 2)} | {_num(a.get('peak_rss_mb'), 0)} "
            f"| {_num(b.get('peak_rss_mb'), 0)} | {_num(ratio['peak_rss_ratio'], 2)} |"
        )
    shares = record["comparison"].get("audit_share_of_precompute", {})
    lines += ["", "| | quarter | full |", "|---|---|---|"]
    lines.append(f"| audit wall / precompute wall | {_num(shares.get('quarter'), 3)} "
                 f"| {_num(shares.get('full'), 3)} |")  # fmt: skip
    lines += [f"| {label} | {cells[0]} | {cells[1]} |" for label, cells in _other_rows(small, big)]
    lines += ["", "Targets (issue 24):", ""]
    lines += [
        f"- [{'x' if met else ' '}] {name}"
        for name, met in record["comparison"]["targets_met"].items()
    ]
    return "\n".join(lines) + "\n"


def _other_rows(*records: Mapping[str, Any]) -> list[tuple[str, list[str]]]:
    def disk(record: Mapping[str, Any], key: str) -> float | None:
        return record.get("disk", {}).get(key)

    def wall(record: Mapping[str, Any], key: str) -> float | None:
        return record.get(key, {}).get("wall_s")

    def features(record: Mapping[str, Any]) -> float | None:
        if "disk" not in record:
            return None
        return record["disk"]["features_bytes"] / record["disk"]["source_bytes"]

    return [
        (
            "data/prepared + data/split + .dvc/cache per source byte",
            [_num(disk(r, "data_and_cache_per_source"), 3) for r in records],
        ),
        ("the same, bytes per image", [_num(disk(r, "bytes_per_image"), 0) for r in records]),
        ("feature file per source byte", [_num(features(r), 3) for r in records]),
        (
            "no-op `dvc status --with-deps train_head` s",
            [_num(wall(r, "dvc_status")) for r in records],
        ),
        ("no-op `dvc repro train_head` s", [_num(wall(r, "dvc_repro_noop")) for r in records]),
    ]


def _num(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def main(argv: list[str] | None = None) -> int:
    from visiontune.fileio import write_json, write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="the full size (>= 4)")
    parser.add_argument("--seed", type=int, default=0, help="the generated set's seed")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="generator processes"
    )
    parser.add_argument(
        "--cache-type", help="override .dvc/config cache.type (e.g. copy: before issue 24)"
    )
    parser.add_argument("--no-tracking", action="store_true", help="tracking.enabled: false")
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--keep", action="store_true", help="keep the temp project copies")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(tempfile.gettempdir()) / "visiontune-bench-data",
        help="where the generated images are written (and kept for the next run), outside the repo",
    )
    args = parser.parse_args(argv)
    args.scratch.mkdir(parents=True, exist_ok=True)
    full, quarter = scale_sets(args.scratch, args.images, args.seed, args.workers, args.data_root)
    record: dict[str, Any] = {
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_state(),
        "cpu_count": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    workdirs = []
    for name, source in (("quarter", quarter), ("full", full)):
        workdirs.append(Path(tempfile.mkdtemp(prefix=f"visiontune-scale-{name}-")))
        record[name] = run_size(source, args, workdirs[-1])
    record["comparison"] = compare(record["quarter"], record["full"])
    record = portable(record)  # no machine's directories in a committed record
    suffix = "" if args.images == 50_000 else f"-{args.images}"
    if args.cache_type:
        suffix += f"-{args.cache_type.replace(',', '-')}"
    results = args.results / f"scale{suffix}.json"
    write_json(results, record)
    write_text(results.with_suffix(".md"), markdown(record))
    print(markdown(record), flush=True)
    if not args.keep:
        for workdir in workdirs:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0 if record["quarter"]["ok"] and record["full"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
