"""A benchmark run (stage costs, the stages' own files, the machine's limits) as ratios and a
table. Pure functions over plain dicts: testable without running anything."""

from __future__ import annotations

import csv
import json
import statistics
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# train_head's is an upper bound, the others lower bounds.
TARGETS = {"precompute_vs_forward": 0.85, "evaluate_vs_forward": 0.85,
           "finetune_epoch_vs_train_step": 0.85, "train_head_vs_finetune_epoch": 0.05}  # fmt: skip


def collect_outputs(project: Path) -> dict[str, Any]:
    """What the stages wrote that the benchmark reads, keyed by stage."""

    def _json(path: Path) -> dict[str, Any]:
        return json.loads(path.read_text()) if path.is_file() else {}

    def _rows(path: Path) -> list[dict[str, str]]:
        return list(csv.DictReader(path.open(newline=""))) if path.is_file() else []

    out = project / "outputs"
    return {
        "train_images": len(_rows(project / "data/split/train.csv")),
        "valid_images": len(_rows(project / "data/split/valid.csv")),
        "prepared_images": len(_rows(project / "data/prepared/manifest.csv")),
        "lr_find_iterations": len(_rows(out / "lr_find/curve.csv")),
        "metrics": {
            "precompute": _json(out / "features/throughput.json"),
            "train_head": _json(out / "head/metrics.json"),
            "finetune": _json(out / "finetune/metrics.json"),
            "evaluate": _json(out / "evaluate/metrics.json"),
        },
        "finetune_history": _rows(out / "finetune/history.csv"),
    }


def _median(history: list[Mapping[str, str]], key: str) -> float | None:
    values = [float(row[key]) for row in history if row.get(key)]
    return statistics.median(values) if values else None


def ratio(value: float | None, limit: float | None) -> float | None:
    return value / limit if value and limit else None


def stage_limit(limits: Mapping[str, Any], stage: str, at_start: float) -> float:
    """A stage's limit: the mean of those measured right before and after it (the host's
    speed drifts), else the one taken at the start of the run."""
    adjacent = (limits.get("adjacent") or {}).get(stage) or {}
    around = [adjacent[w]["images_per_s"] for w in ("before", "after") if w in adjacent]
    return sum(around) / len(around) if around else at_start


def summarize(
    stages: list[Mapping[str, Any]],
    outputs: Mapping[str, Any],
    params: Mapping[str, Any],
    limits: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Per-stage rows, accuracies, and each stage's ratio to its limit against the targets."""
    m, history = outputs["metrics"], outputs["finetune_history"]
    ft, train, valid = params["finetune"], outputs["train_images"], outputs["valid_images"]
    epochs = sum(ft["cycle_len"] * ft["cycle_mult"] ** i for i in range(ft["n_cycles"]))
    views = m["evaluate"].get("n_views")  # None: evaluate wrote nothing (it failed)
    images = {
        "fetch": outputs["prepared_images"],
        "precompute": m["precompute"].get("images"),
        "lr_find": outputs["lr_find_iterations"] * params["lr_find"]["batch_size"],
        "finetune": epochs * train,
        "evaluate": valid * views if views else None,
    }
    reported = {  # each stage's own loop, start-up excluded; evaluate's per view
        "precompute": m["precompute"].get("images_per_s"),
        "finetune": _median(history, "images_per_s"),
        "evaluate": m["evaluate"]["images_per_s"] * views if views else None,
    }
    rows = []
    for stage in stages:
        name, n, own = stage["name"], images.get(stage["name"]), m.get(stage["name"], {})
        rows.append({**stage, "images": n,
                     "images_per_s_wall": n / stage["wall_s"] if n and stage["wall_s"] else None,
                     "images_per_s_reported": reported.get(name),
                     # Where a GPU's time goes: the stage's own loader wait and peak memory.
                     "data_wait_share": own.get("data_wait_share"),
                     "peak_gpu_mib": own.get("peak_gpu_mib")})  # fmt: skip
    result: dict[str, Any] = {
        "stages": rows,
        "total_wall_s": sum(s["wall_s"] for s in stages),
        "accuracy": {
            "baseline": (outputs.get("baseline") or {}).get("accuracy"),
            "head": m["train_head"].get("valid_acc"),
            "finetune": m["finetune"].get("valid_acc"),
            "evaluate": m["evaluate"].get("accuracy"),
            "evaluate_tta": m["evaluate"].get("accuracy_tta"),
        },
        "finetune_epoch_s": _median(history, "seconds"),
    }
    if not limits:
        return result
    forward = {int(bs): f["images_per_s"] for bs, f in limits["forward"].items()}
    pre, tta = params["precompute"]["batch_size"], params["tta"]["batch_size"]
    used = result["limits_used"] = {
        "precompute": stage_limit(limits, "precompute", forward[pre]),
        "evaluate": stage_limit(limits, "evaluate", forward[tta]),
        "finetune": stage_limit(limits, "finetune", limits["train_step"]["images_per_s"]),
    }  # fmt: skip
    head_wall = next((row["wall_s"] for row in rows if row["name"] == "train_head"), None)
    ratios = result["ratios"] = {
        "precompute_vs_forward": ratio(reported["precompute"], used["precompute"]),
        "evaluate_vs_forward": ratio(reported["evaluate"], used["evaluate"]),
        "finetune_epoch_vs_train_step": ratio(reported["finetune"], used["finetune"]),
        "train_head_vs_finetune_epoch": ratio(head_wall, result["finetune_epoch_s"]),
    }
    result["targets_met"] = {
        key: None if ratios[key] is None
        else (ratios[key] < bound if key.startswith("train_head") else ratios[key] >= bound)
        for key, bound in TARGETS.items()
    }  # fmt: skip
    return result


def limit_rates(limits: Mapping[str, Any]) -> str:
    """The limits' images/s on one line."""
    forward = {f"forward at {bs}": f for bs, f in limits["forward"].items()}
    decode = {f"decode {key}": d for key, d in limits["decode"].items()}
    rates = forward | {"train step": limits["train_step"]} | decode
    return ", ".join(f"{key} {r['images_per_s']:.1f} img/s" for key, r in rates.items())


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(name: str, record: Mapping[str, Any]) -> str:
    """One dataset's benchmark record as a short markdown report."""
    s, git, acc = record["summary"], record["git"], record["summary"]["accuracy"]
    lines = [
        f"# Benchmark: {name}",
        "",
        f"{record['started']} · commit `{git['commit'][:10]}`{' (dirty)' if git['dirty'] else ''}"
        f" · {'quick' if record['quick'] else 'full'} run",
        "",
        "| stage | wall s | images | img/s (wall) | img/s (stage) | CPU s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *(f"| {r['name']} | {_fmt(r['wall_s'])} | {_fmt(r['images'], 'd')} | "
          f"{_fmt(r['images_per_s_wall'])} | {_fmt(r['images_per_s_reported'])} | "
          f"{_fmt(r['cpu_s'])} | {_fmt(r['peak_rss_mb'], '.0f')} |" for r in s["stages"]),
        f"| **total** | {_fmt(s['total_wall_s'])} | | | | | |",
        "",
        "Valid accuracy: " + ", ".join(f"{k} {_fmt(v, '.2%')}" for k, v in acc.items()),
        "",
    ]  # fmt: skip
    limits = record.get("limits")
    if not limits:
        return "\n".join(lines)
    lines += [
        f"Limits ({limits['backbone']}, {limits['image_size']} px, {limits['precision']}, "
        f"{limits['torch_threads']} torch threads, {limits['cpu']}): {limit_rates(limits)}",
        "",
        "| ratio | measured | limit used | target |",
        "|---|---:|---:|---:|",
    ]  # fmt: skip
    for key, value in s["ratios"].items():
        stage, bound = key.split("_")[0], TARGETS[key]
        target, limit = f"{'<' if stage == 'train' else '≥'} {bound}", s["limits_used"].get(stage)
        lines.append(f"| {key} | {_fmt(value, '.3f')} | {_fmt(limit)} | {target} |")
    return "\n".join([*lines, ""])
