"""`make bench-scale`: source_stamp → fetch → split → precompute → audit → train_head on a
generated set of 50,000 photos and on its first quarter, each in its own project copy: per
stage s per 1,000 images and peak RSS at both sizes and their ratios, disk use per source byte,
no-op `dvc status`/`dvc repro` times, targets met. Writes bench/results/scale.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import project as bench
import yaml
from PIL import Image, ImageOps
from summary import collect_outputs

SHARED_DATA = bench.REPO_ROOT.parent / "shared" / "data"
SCRATCH = Path(tempfile.gettempdir()) / "visiontune-bench-data"  # kept for the next run
DVC = str(Path(sys.executable).parent / "dvc")
STAGES = ("source_stamp", "fetch", "split", "precompute", "audit", "train_head")
TIMED = STAGES[1:]
# Issue 24: same-run ratios of the full size to the quarter; issue 32: the audit's wall time
# (process start included) against precompute's, from 12,500 images (below, imports dominate).
TARGETS = {"s_per_1k_ratio": 1.15, "peak_rss_ratio": 1.5, "disk_per_source": 1.1,
           "audit_share": 0.1}  # fmt: skip
AUDIT_TARGET_IMAGES = 12_500
# `du` counts each inode once, in the first folder holding it: outputs/ first, so the feature
# file's cache object (a hardlink to outputs/) does not count as data.
DISK = ("outputs", "data/prepared", "data/split", ".dvc/cache")


# Image i is a variant of dogscats photo i mod 3000 (in a seeded order, so any first n mix the
# classes and splits) in that photo's folder, `train/cats/cat.1.v003.jpg`: a crop of 50-100 % of
# each side, mirrored half the time, long side 160-512 px, JPEG quality 85-95. One RNG per
# (seed, i): the same images whatever the worker count, and any bigger set starts with them.
def variant_paths(data: Path, seed: int, images: int) -> list[tuple[Path, Path]]:
    """(photo, path in the set) of images 0..`images`-1."""
    photos = sorted((data / "dogscats").glob("*/*/*.jpg"))
    if not photos:
        raise FileNotFoundError(f"no dogscats photos under {data}")
    photos = [photos[i] for i in np.random.default_rng(seed).permutation(len(photos))]
    variants = [(i, photos[i % len(photos)]) for i in range(images)]
    name = "{0.stem}.v{1:03d}.jpg"
    return [(p, Path(*p.parts[-3:-1], name.format(p, i // len(photos)))) for i, p in variants]


def _make_images(job: tuple[list[tuple[Path, Path]], int, int, Path]) -> None:
    paths, start, seed, out = job
    for index, (photo, rel) in enumerate(paths, start):
        rng = np.random.default_rng([seed, index])
        with Image.open(photo) as img:
            img = img.convert("RGB")
        w, h = img.size
        width, height = (max(1, int(side * rng.uniform(0.5, 1.0))) for side in img.size)
        left, top = int(rng.integers(0, w - width + 1)), int(rng.integers(0, h - height + 1))
        img = img.crop((left, top, left + width, top + height))
        img = ImageOps.mirror(img) if rng.random() < 0.5 else img
        scale = int(rng.integers(160, 513)) / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))))
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(out / rel, quality=int(rng.integers(85, 96)))


def scale_set(scratch: Path, images: int, seed: int = 0, data: Path = SHARED_DATA) -> Path:
    """`scratch/scale-s<seed>-<images>`, kept: hardlinked from a bigger set there, else made."""
    scratch.mkdir(parents=True, exist_ok=True)
    out = scratch / f"scale-s{seed}-{images}"
    if out.is_dir():
        return out
    shutil.rmtree(tmp := out.with_suffix(".tmp"), ignore_errors=True)
    names = (re.fullmatch(rf"scale-s{seed}-(.*-)?(\d+)", p.name) for p in scratch.iterdir())
    bigger = {int(m[2]): scratch / m[0] for m in names if m and int(m[2]) > images}
    paths = variant_paths(data, seed, images)
    if bigger:
        for _, rel in paths:
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            os.link(bigger[min(bigger)] / rel, tmp / rel)
    else:
        print(f"-- generating {images} images into {out}", flush=True)
        with ProcessPoolExecutor(os.cpu_count()) as pool:
            jobs = [(paths[i : i + 500], i, seed, tmp) for i in range(0, images, 500)]
            list(pool.map(_make_images, jobs))
    return tmp.rename(out)


def du(*folders: Path) -> list[int]:
    """`du -sb` of each folder: apparent bytes, each inode once, in the first folder holding it."""
    out = subprocess.run(["du", "-sb", *folders], capture_output=True, text=True, check=True)
    return [int(line.split("\t")[0]) for line in out.stdout.splitlines()]


def run_size(source: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """One size: the stages measured alone, then disk use and DVC's no-op times."""
    params = yaml.safe_load((bench.REPO_ROOT / "params.yaml").read_text())
    params["data"]["source"] = str(source)
    if args.no_tracking:
        params["tracking"]["enabled"] = False
    project = bench.make_project(work / "repo", params)
    print(f"== {source}", flush=True)
    runs = bench.run_pipeline(project, only=STAGES)
    ok = bool(runs) and all(r.returncode == 0 for r in runs)
    n = collect_outputs(project)["prepared_images"] if ok else 0
    stages = {r.name: r.to_dict() | {"s_per_1k": 1000 * r.wall_s / n if n else None} for r in runs}
    record: dict[str, Any] = {"source": str(source), "ok": ok, "images": n, "stages": stages}
    if not ok:
        return record
    for name, command in (("dvc_status", ["status", "--with-deps"]), ("dvc_repro_noop", ["repro"])):
        log = project / f"bench-logs/{name}.log"
        env = bench.project_env(project)
        run = bench.run_measured(name, [DVC, *command, "train_head"], project, env, log)
        # Nothing changed: only source_stamp (always_changed) may run.
        reran = [stage for stage in TIMED if f"Running stage '{stage}'" in run.log]
        record[name] = run.to_dict() | {"log_tail": run.log[-400:], "reran": reran}
    data, source_bytes = sum(du(*(project / folder for folder in DISK))[1:]), du(source)[0]
    features = project / "outputs/features/features.safetensors"
    record["disk"] = {"source_bytes": source_bytes, "data_and_cache_bytes": data,
                      "features_bytes": features.stat().st_size, "bytes_per_image": data / n,
                      "data_and_cache_per_source": data / source_bytes}  # fmt: skip
    return record


def compare(small: dict[str, Any], big: dict[str, Any]) -> dict[str, Any]:
    """Full-size / quarter ratios per stage, the audit's share of precompute, targets met."""
    rows, checks, shares = {}, {}, {}
    for stage in TIMED:
        a, b = small["stages"].get(stage, {}), big["stages"].get(stage, {})
        for key, field in (("s_per_1k_ratio", "s_per_1k"), ("peak_rss_ratio", "peak_rss_mb")):
            value = b.get(field) / a[field] if a.get(field) and b.get(field) is not None else None
            rows.setdefault(stage, {})[key] = value
            checks[f"{stage} {key} <= {TARGETS[key]}"] = value is not None and value <= TARGETS[key]
    for name, record in (("quarter", small), ("full", big)):
        stages = record["stages"]
        if "audit" in stages and "precompute" in stages:
            share = shares[name] = stages["audit"]["wall_s"] / stages["precompute"]["wall_s"]
            if record["images"] >= AUDIT_TARGET_IMAGES:
                checks[f"{name} audit <= 0.1 of precompute"] = share <= TARGETS["audit_share"]
        if "disk" in record:
            per_source = record["disk"]["data_and_cache_per_source"]
            checks[f"{name} disk per source byte <= 1.1"] = per_source <= TARGETS["disk_per_source"]
    if noop := big.get("dvc_repro_noop"):
        checks["full no-op dvc repro <= 30 s"] = noop["wall_s"] <= 30.0 and not noop["reran"]
    return {"ratios": rows, "audit_share_of_precompute": shares, "targets_met": checks}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=50_000, help="the full size (>= 4)")
    parser.add_argument("--no-tracking", action="store_true", help="tracking.enabled: false")
    parser.add_argument("--results", type=Path, default=bench.REPO_ROOT / "bench/results")
    parser.add_argument("--scratch", type=Path, default=SCRATCH, help="the generated images")
    args = parser.parse_args(argv)
    full, quarter = (scale_set(args.scratch, n) for n in (args.images, args.images // 4))
    record: dict[str, Any] = {
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": bench.git_state(), "cpu_count": os.cpu_count(),
        "args": {k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="visiontune-scale-") as work:
        for name, source in (("quarter", quarter), ("full", full)):
            record[name] = run_size(source, args, Path(work, name))
    record["comparison"] = compare(record["quarter"], record["full"])
    record = bench.portable(record)  # no machine's directories in a committed record
    suffix = "" if args.images == 50_000 else f"-{args.images}"  # a try keeps the record
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / f"scale{suffix}.json").write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record["comparison"], indent=2), flush=True)
    return 0 if record["quarter"]["ok"] and record["full"]["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
