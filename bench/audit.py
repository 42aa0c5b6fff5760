"""Audit bench: plant label flips and near-duplicates in a copy of a photo set, run the
pipeline's stages to the audit, and score what the audit found against what was planted.

    python bench/audit.py ../shared/data/dogscats --seeds 0 1 2 --out bench/results/audit

A planted copy is the source's own layout (a folder per class, or images + labels CSV) with:
- `--flip` of the labelled images given another class, chosen uniformly;
- `--dups` near-duplicates per 1,000 images: a copy of a random image, cropped by up to
  `--crop` per side, resized to 50-90 %, JPEG re-encoded at quality 50-90, filed under the same
  class (and, where the source has train/valid folders, on a random side of the split).
Errors the set already had are not known: they count against precision.
"""

from __future__ import annotations

import argparse
import importlib.util
import io
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from visiontune.data.images import is_image_name  # noqa: E402


@dataclass(frozen=True)
class Planted:
    root: Path
    labels_csv: Path | None  # the labels CSV of a CSV-labelled source
    flips: dict[str, str]  # planted path (relative to root) -> the true label
    duplicates: list[tuple[str, str]]  # (original, copy), paths relative to root


def _near_copy(source: Path, rng: np.random.Generator, crop: float) -> bytes:
    with Image.open(source) as image:
        image = image.convert("RGB")
        w, h = image.size
        box = [rng.uniform(0, crop) for _ in range(4)]
        image = image.crop((box[0] * w, box[1] * h, w - box[2] * w, h - box[3] * h))
        scale = rng.uniform(0.5, 0.9)
        image = image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=int(rng.integers(50, 91)))
    return out.getvalue()


def plant(source: Path, dest: Path, *, seed: int, flip: float, dups: float, crop: float) -> Planted:
    """A copy of `source` with planted flips and near-duplicates (see the module doc)."""
    rng = np.random.default_rng(seed)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(source, dest)
    csvs = sorted(dest.glob("*.csv"))
    if csvs:  # images + labels CSV (dogbreeds: train/<id>.jpg, labels.csv id,breed)
        labels_csv = csvs[0]
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
        id_col, label_col = table.columns[:2]
        files = {p.stem: p for p in dest.rglob("*") if is_image_name(p)}
        pairs = zip(table[id_col], table[label_col], strict=True)
        rows = [(files[i].relative_to(dest).as_posix(), lab) for i, lab in pairs if i in files]
    else:
        labels_csv = None
        rows = [(p.relative_to(dest).as_posix(), p.parent.name)
                for p in sorted(dest.rglob("*")) if is_image_name(p)]  # fmt: skip
    rows.sort()
    classes = sorted({label for _, label in rows})
    order = rng.permutation(len(rows))
    n_flip, n_dup = round(flip * len(rows)), round(dups * len(rows) / 1000)
    flip_rows = [rows[i] for i in order[:n_flip]]
    dup_rows = [rows[i] for i in order[n_flip : n_flip + n_dup]]
    flips: dict[str, str] = {}
    new_labels: dict[str, str] = {}
    for rel, label in flip_rows:
        wrong = str(rng.choice([c for c in classes if c != label]))
        if labels_csv is None:  # move it into the wrong class folder
            parts = Path(rel).parts
            moved = Path(*parts[:-2], wrong, parts[-1]).as_posix()
            (dest / moved).parent.mkdir(parents=True, exist_ok=True)
            (dest / rel).rename(dest / moved)
            rel = moved
        new_labels[Path(rel).stem] = wrong
        flips[rel] = label
    duplicates = []
    for rel, label in dup_rows:
        parts = Path(rel).parts
        name = f"nearcopy{len(duplicates)}_{Path(rel).stem}.jpg"
        if labels_csv is None and len(parts) >= 3 and parts[-3] in ("train", "valid"):
            side = "train" if rng.random() < 0.5 else "valid"
            copy = Path(*parts[:-3], side, *parts[-2:-1], name).as_posix()
        else:
            copy = Path(*parts[:-1], name).as_posix()
        (dest / copy).parent.mkdir(parents=True, exist_ok=True)
        (dest / copy).write_bytes(_near_copy(dest / rel, rng, crop))
        new_labels[Path(copy).stem] = label
        duplicates.append((rel, copy))
    if labels_csv is not None:
        known = dict(zip(table[id_col], table[label_col], strict=True))
        known.update(new_labels)
        pd.DataFrame(sorted(known.items()), columns=[id_col, label_col]).to_csv(
            labels_csv, index=False
        )
    truth = {"flips": flips, "duplicates": duplicates, "seed": seed}
    (dest.parent / f"{dest.name}.truth.json").write_text(json.dumps(truth, indent=1))
    return Planted(dest, labels_csv, flips, duplicates)


def run_stages(planted: Planted, project: Path, stages: list[str]) -> dict[str, float]:
    """A project copy whose data.source is the planted set; run `stages` in it (seconds each)."""
    import yaml
    from project import make_project, run_pipeline

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"]["source"] = str(planted.root)
    params["data"]["labels"] = planted.labels_csv.name if planted.labels_csv else None
    if planted.labels_csv is not None:
        header = planted.labels_csv.read_text().splitlines()[0].split(",")
        params["data"]["id_column"], params["data"]["label_column"] = header[:2]
    params["tracking"]["enabled"] = False
    if not (project / "params.yaml").exists():
        make_project(project, params)
    runs = run_pipeline(project, echo=False, only=stages, commit=False)
    if len(runs) < len(stages) or runs[-1].returncode != 0:
        raise RuntimeError(f"{runs[-1].name} failed in {project}:\n{runs[-1].log[-3000:]}")
    return {run.name: run.wall_s for run in runs}


def stage_seconds(project: Path, stage: str) -> float:
    """`stage`'s own time: its main() in this process, the second of two calls (the first
    pays the imports), with tracking off as run_stages set it."""
    from project import stage_argv

    spec = importlib.util.spec_from_file_location(stage, project / "stages" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    here = Path.cwd()
    os.chdir(project)
    try:
        for _ in range(2):
            start = time.perf_counter()
            if module.main(stage_argv(stage, project)) != 0:
                raise RuntimeError(f"{stage} failed in {project}")
            seconds = time.perf_counter() - start
    finally:
        os.chdir(here)
    return seconds


def score(findings_csv: Path, planted: Planted, images: int) -> dict[str, float]:
    """The audit's findings against what was planted."""
    findings = pd.read_csv(findings_csv, dtype=str, keep_default_na=False)
    labels = set(findings.loc[findings["kind"] == "label", "path"])
    flips = set(planted.flips)
    pairs = findings[findings["kind"] == "duplicate"]
    found = {frozenset(p) for p in zip(pairs["path"], pairs["other_path"], strict=True)}
    truth = {frozenset(p) for p in planted.duplicates}
    return {
        "images": images,
        "flips": len(flips),
        "flagged": len(labels),
        "label_recall": len(labels & flips) / max(len(flips), 1),
        "label_precision": len(labels & flips) / max(len(labels), 1),
        "duplicates": len(truth),
        "duplicates_found": len(found & truth) / max(len(truth), 1),
        "other_pairs_per_1000": 1000 * len(found - truth) / images,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sources", nargs="+", type=Path, help="photo sets to plant into")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--flip", type=float, default=0.04, help="share of labels flipped")
    parser.add_argument("--dups", type=float, default=20, help="near-copies per 1,000 images")
    parser.add_argument("--crop", type=float, default=0.0, help="max crop per side of a copy")
    parser.add_argument("--work", type=Path, default=Path("/tmp/visiontune-audit-bench"))
    parser.add_argument("--out", type=Path, default=REPO / "bench/results/audit.json")
    args = parser.parse_args(argv)
    results = []
    for source in args.sources:
        for seed in args.seeds:
            base = args.work / f"{source.name}-{seed}"
            if base.exists():
                shutil.rmtree(base)
            planted = plant(source, base / "photos", seed=seed, flip=args.flip, dups=args.dups,
                            crop=args.crop)  # fmt: skip
            stages = ["source_stamp", "fetch", "split", "precompute", "audit"]
            seconds = run_stages(planted, base / "project", stages)
            project = base / "project"
            metrics = json.loads((project / "outputs/audit/metrics.json").read_text())
            throughput = json.loads((project / "outputs/features/throughput.json").read_text())
            row = {"set": source.name, "seed": seed,
                   **score(base / "project/outputs/audit/findings.csv", planted,
                           metrics["images"]),
                   "audit_in_stage_s": stage_seconds(project, "audit"),
                   "precompute_in_stage_s": throughput["seconds"],
                   "audit_stage_s": seconds["audit"], "precompute_stage_s": seconds["precompute"],
                   "probe_cv_accuracy": metrics["probe_cv_accuracy"]}  # fmt: skip
            print(json.dumps(row), flush=True)
            results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"flip": args.flip, "dups": args.dups, "crop": args.crop}
    args.out.write_text(json.dumps({"settings": settings, "runs": results}, indent=1) + "\n")
    frame = pd.DataFrame(results)
    print(frame.groupby("set").mean(numeric_only=True).round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
