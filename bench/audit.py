"""Audit bench: plant label flips and near-duplicates in a copy of a photo set, run the
pipeline to the audit, and score its findings against what was planted.

    python bench/audit.py ../shared/data/dogscats --seeds 0 1 2 --out bench/results/audit.json

A copy keeps the source's layout (class folders, or images + labels CSV); `--flip` of its labels
move to another class; `--dups` near-copies per 1,000 images (`--crop` per side, 50-90 % size,
JPEG quality 50-90) join its class, on a random side of train/valid if any. The set's own errors
count against precision. Cost: audit / precompute wall time, as the audit logs no in-stage time.
"""

import argparse
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from project import make_project, run_pipeline

from visiontune.data.images import is_image_name

REPO = Path(__file__).resolve().parents[1]
STAGES = ["source_stamp", "fetch", "split", "precompute", "audit"]


def near_copy(source: Path, rng: np.random.Generator, crop: float) -> bytes:
    image = Image.open(source).convert("RGB")  # a single-frame image closes its file on load
    w, h = image.size
    left, top, right, bottom = rng.uniform(0, crop, 4)
    image = image.crop((left * w, top * h, w - right * w, h - bottom * h))
    scale = rng.uniform(0.5, 0.9)
    image = image.resize((max(8, round(w * scale)), max(8, round(h * scale))), Image.LANCZOS)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=int(rng.integers(50, 91)))
    return out.getvalue()


def plant(source: Path, dest: Path, *, seed: int, flip: float, dups: float, crop: float) -> dict:
    """Copy `source` to a new `dest`, plant flips and near-copies (module doc). The truth, also
    in `<dest>.truth.json`: `flips` {path: true label}, `duplicates` [(original, copy)] (paths
    relative to `dest`), and `data`, the params.data keys that read the copy."""
    rng = np.random.default_rng(seed)
    shutil.copytree(source, dest)
    data = {"source": str(dest), "labels": None}
    labels_csv = next(iter(sorted(dest.glob("*.csv"))), None)
    images = [(p.relative_to(dest).as_posix(), p) for p in dest.rglob("*") if is_image_name(p)]
    if labels_csv:  # images + labels CSV (dogbreeds: train/<id>.jpg, labels.csv id,breed)
        table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False)
        id_col, label_col = table.columns[:2]
        known = dict(zip(table[id_col], table[label_col], strict=True))
        data |= {"labels": labels_csv.name, "id_column": id_col, "label_column": label_col}
        rows = sorted((rel, known[p.stem]) for rel, p in images if p.stem in known)
    else:
        rows = sorted((rel, p.parent.name) for rel, p in images)
    order = rng.permutation(len(rows))
    n_flip, n_dup = round(flip * len(rows)), round(dups * len(rows) / 1000)
    flips, duplicates, new_labels = {}, [], {}
    for rel, label in (rows[i] for i in order[:n_flip]):
        wrong = str(rng.choice(sorted({c for _, c in rows} - {label})))
        if not labels_csv:  # move it into the wrong class's folder
            moved = dest / Path(rel).parent.parent / wrong / Path(rel).name
            moved.parent.mkdir(parents=True, exist_ok=True)
            rel = (dest / rel).rename(moved).relative_to(dest).as_posix()
        new_labels[Path(rel).stem] = wrong
        flips[rel] = label
    for rel, label in (rows[i] for i in order[n_flip : n_flip + n_dup]):
        parts = Path(rel).parts
        copy = Path(rel).with_name(f"nearcopy{len(duplicates)}_{Path(rel).stem}.jpg")
        if not labels_csv and len(parts) >= 3 and parts[-3] in ("train", "valid"):
            copy = Path(*parts[:-3], ("train", "valid")[rng.random() >= 0.5], parts[-2], copy.name)
        (dest / copy).parent.mkdir(parents=True, exist_ok=True)
        (dest / copy).write_bytes(near_copy(dest / rel, rng, crop))
        new_labels[copy.stem] = label
        duplicates.append((rel, copy.as_posix()))
    if labels_csv:
        table = pd.DataFrame(sorted((known | new_labels).items()), columns=[id_col, label_col])
        table.to_csv(labels_csv, index=False)
    truth = {"flips": flips, "duplicates": duplicates, "data": data, "seed": seed}
    dest.with_name(f"{dest.name}.truth.json").write_text(json.dumps(truth, indent=1))
    return truth


def run_stages(data: dict, project: Path) -> dict[str, float]:
    """Wall seconds of each of STAGES in a project copy: `data` in params.data, tracking off."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"] |= data
    params["tracking"]["enabled"] = False
    runs = run_pipeline(make_project(project, params), echo=False, only=STAGES, commit=False)
    if len(runs) < len(STAGES) or runs[-1].returncode != 0:
        raise RuntimeError(f"{runs[-1].name} failed in {project}:\n{runs[-1].log[-3000:]}")
    return {run.name: run.wall_s for run in runs}


def score(findings_csv: Path, truth: dict, images: int) -> dict[str, float]:
    """The audit's findings against what was planted."""
    findings = pd.read_csv(findings_csv, dtype=str, keep_default_na=False)
    labels, flips = set(findings.loc[findings["kind"] == "label", "path"]), set(truth["flips"])
    pairs = findings[findings["kind"] == "duplicate"]
    found = {frozenset(p) for p in zip(pairs["path"], pairs["other_path"], strict=True)}
    planted = {frozenset(p) for p in truth["duplicates"]}
    hit, copies = len(labels & flips), len(found & planted)
    return {"images": images, "flips": len(flips), "flagged": len(labels),
            "label_recall": hit / max(len(flips), 1), "label_precision": hit / max(len(labels), 1),
            "duplicates": len(planted), "duplicates_found": copies / max(len(planted), 1),
            "other_pairs_per_1000": 1000 * len(found - planted) / images}  # fmt: skip


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
    for source, seed in ((source, seed) for source in args.sources for seed in args.seeds):
        base = args.work / f"{source.name}-{seed}"
        shutil.rmtree(base, ignore_errors=True)
        truth = plant(source, base / "photos", seed=seed, flip=args.flip, dups=args.dups,
                      crop=args.crop)  # fmt: skip
        seconds = run_stages(truth["data"], base / "project")
        metrics = json.loads((base / "project/outputs/audit/metrics.json").read_text())
        row = {"set": source.name, "seed": seed,
               **score(base / "project/outputs/audit/findings.csv", truth, metrics["images"]),
               "probe_cv_accuracy": metrics["probe_cv_accuracy"],
               "audit_stage_s": seconds["audit"], "precompute_stage_s": seconds["precompute"],
               "audit_share": seconds["audit"] / seconds["precompute"]}  # fmt: skip
        print(json.dumps(row), flush=True)
        results.append(row)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {"flip": args.flip, "dups": args.dups, "crop": args.crop}
    args.out.write_text(json.dumps({"settings": settings, "runs": results}, indent=1) + "\n")
    print(pd.DataFrame(results).groupby("set").mean(numeric_only=True).round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
