"""Turn a benchmark run (stage costs, stage outputs, machine limits) into numbers and a table.

Pure functions over plain dicts, so they are testable without running anything.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

TARGETS = {
    "precompute_vs_forward": 0.85,
    "evaluate_vs_forward": 0.85,
    "finetune_epoch_vs_train_step": 0.85,
    "train_head_vs_finetune_epoch": 0.05,  # an upper bound
}


def find_number(data: Any, keys: Iterable[str]) -> float | None:
    """The first of `keys` found in `data` (searched depth-first in nested dicts)."""
    keys = list(keys)
    if not isinstance(data, Mapping):
        return None
    for key in keys:
        value = data.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    for value in data.values():
        found = find_number(value, keys)
        if found is not None:
            return found
    return None


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def read_rows(path: Path) -> list[dict[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def count_rows(path: Path) -> int:
    return len(read_rows(path))


ACCURACY_KEYS = ("valid_acc", "valid_accuracy", "accuracy", "acc", "valid/acc")
EPOCH_TIME_KEYS = ("train_s", "train_time_s", "epoch_train_s", "epoch_time_s", "time_s", "seconds")


def collect_outputs(project: Path) -> dict[str, Any]:
    """Everything the stages reported that the benchmark needs, read from the project copy."""
    outputs = project / "outputs"
    metrics = {
        name: read_json(outputs / name / "metrics.json")
        for name in ("head", "finetune", "evaluate")
    }
    metrics["precompute"] = read_json(outputs / "features" / "throughput.json")
    history = read_rows(outputs / "finetune" / "history.csv")
    return {
        "train_images": count_rows(project / "data" / "split" / "train.csv"),
        "valid_images": count_rows(project / "data" / "split" / "valid.csv"),
        "prepared_images": count_rows(project / "data" / "prepared" / "manifest.csv"),
        "lr_find_iterations": count_rows(outputs / "lr_find" / "curve.csv"),
        "lr_suggestion": read_json(outputs / "lr_find" / "suggestion.json"),
        "metrics": metrics,
        "finetune_history": history,
    }


def finetune_epoch_seconds(
    history: list[Mapping[str, str]], finetune_wall: float | None, epochs: int
) -> tuple[float | None, str]:
    """Median training seconds of one fine-tune epoch, and where the number came from."""
    times = []
    for row in history:
        for key in EPOCH_TIME_KEYS:
            if row.get(key) not in (None, ""):
                times.append(float(row[key]))
                break
    if times:
        times.sort()
        return times[len(times) // 2], "history.csv"
    if finetune_wall and epochs:
        return finetune_wall / epochs, "stage wall / epochs"
    return None, "unknown"


def finetune_epoch_rate(
    history: list[Mapping[str, str]], train_images: int, epoch_s: float | None
) -> float | None:
    """Median images/s of a fine-tune epoch as the loop itself reports it (history.csv's
    `images_per_s`: its training steps only, all ranks), else train images / epoch seconds."""
    rates = sorted(float(row["images_per_s"]) for row in history if row.get("images_per_s"))
    if rates:
        return rates[len(rates) // 2]
    return train_images / epoch_s if epoch_s else None


def stage_images(outputs: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, int]:
    """Images each stage pushes through the model (views for evaluate, steps for lr_find)."""
    train, valid = outputs["train_images"], outputs["valid_images"]
    ft = params["finetune"]
    epochs = sum(ft["cycle_len"] * ft["cycle_mult"] ** i for i in range(ft["n_cycles"]))
    views = int(
        find_number(outputs["metrics"].get("evaluate", {}), ("n_views",))
        or 1 + int(params["tta"]["n_augment"])
    )
    return {
        "fetch": outputs["prepared_images"],
        "precompute": train + valid,
        "lr_find": outputs["lr_find_iterations"] * int(params["lr_find"]["batch_size"]),
        "finetune": epochs * train,
        "evaluate": valid * views,
    }


def ratio(value: float | None, limit: float | None) -> float | None:
    return value / limit if value and limit else None


def stage_limit(limits: Mapping[str, Any], stage: str, at_start: float) -> dict[str, Any]:
    """The limit a stage's ratio is taken against: the mean of the measurements right
    before and after the stage (`limits["adjacent"]`, see bench/limits.py LimitProbe),
    else the one taken at the start of the run."""
    adjacent = (limits.get("adjacent") or {}).get(stage) or {}
    around = {
        when: adjacent[when]["images_per_s"] for when in ("before", "after") if when in adjacent
    }
    value = sum(around.values()) / len(around) if around else at_start
    return {
        "images_per_s": value,
        "source": "next to the stage" if around else "start of run",
        "at_start": at_start,
        **around,
    }


def summarize(
    stages: list[Mapping[str, Any]],
    outputs: Mapping[str, Any],
    params: Mapping[str, Any],
    limits: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """Per-stage rows, accuracies, ratios to the limits and pass/fail against the targets."""
    walls = {s["name"]: s["wall_s"] for s in stages}
    images = stage_images(outputs, params)
    m = outputs["metrics"]
    rows = []
    for stage in stages:
        n = images.get(stage["name"])
        reported = find_number(m.get(stage["name"], {}), ("images_per_s", "img_per_s"))
        if reported and stage["name"] == "evaluate" and n:
            # evaluate reports images (all views of one image) per second: per view here.
            reported *= n / outputs["valid_images"]
        rows.append(
            {
                **stage,
                "images": n,
                "images_per_s_wall": n / stage["wall_s"] if n and stage["wall_s"] else None,
                "images_per_s_reported": reported,
                # Where a GPU's time went: the stage's own loader wait and peak memory.
                "data_wait_share": find_number(m.get(stage["name"], {}), ("data_wait_share",)),
                "peak_gpu_mib": find_number(m.get(stage["name"], {}), ("peak_gpu_mib",)),
            }
        )
    ft = params["finetune"]
    epochs = sum(ft["cycle_len"] * ft["cycle_mult"] ** i for i in range(ft["n_cycles"]))
    epoch_s, epoch_source = finetune_epoch_seconds(
        outputs["finetune_history"], walls.get("finetune"), epochs
    )
    accuracy = {
        "baseline": (outputs.get("baseline") or {}).get("accuracy"),
        "head": find_number(m["head"], ACCURACY_KEYS),
        "finetune": find_number(m["finetune"], ACCURACY_KEYS),
        "evaluate": find_number(m["evaluate"], ("accuracy",)),
        "evaluate_tta": find_number(m["evaluate"], ("accuracy_tta",)),
    }
    result: dict[str, Any] = {
        "stages": rows,
        "total_wall_s": sum(walls.values()),
        "accuracy": accuracy,
        "finetune_epoch_s": epoch_s,
        "finetune_epoch_source": epoch_source,
    }
    if not limits:
        return result
    by_name = {r["name"]: r for r in rows}

    def rate(name: str) -> float | None:
        row = by_name.get(name, {})
        return row.get("images_per_s_reported") or row.get("images_per_s_wall")

    fwd = limits["forward"]
    pre_bs, tta_bs = str(params["precompute"]["batch_size"]), str(params["tta"]["batch_size"])
    used = {
        "precompute": stage_limit(limits, "precompute", fwd[pre_bs]["images_per_s"]),
        "evaluate": stage_limit(limits, "evaluate", fwd[tta_bs]["images_per_s"]),
        "finetune": stage_limit(limits, "finetune", limits["train_step"]["images_per_s"]),
    }
    result["limits_used"] = used
    epoch_rate = finetune_epoch_rate(outputs["finetune_history"], outputs["train_images"], epoch_s)
    head_wall = walls.get("train_head")
    head_inner = find_number(m["head"], ("train_seconds", "train_s", "seconds"))
    pre, ev = used["precompute"]["images_per_s"], used["evaluate"]["images_per_s"]
    result["ratios"] = {
        "precompute_vs_forward": ratio(rate("precompute"), pre),
        "precompute_wall_vs_forward": ratio(
            by_name.get("precompute", {}).get("images_per_s_wall"), pre
        ),
        "evaluate_vs_forward": ratio(rate("evaluate"), ev),
        "evaluate_wall_vs_forward": ratio(by_name.get("evaluate", {}).get("images_per_s_wall"), ev),
        "finetune_epoch_vs_train_step": ratio(epoch_rate, used["finetune"]["images_per_s"]),
        "train_head_vs_finetune_epoch": ratio(head_wall, epoch_s),
        "train_head_inner_vs_finetune_epoch": ratio(head_inner, epoch_s),
    }
    result["targets_met"] = {
        key: (
            None
            if result["ratios"][key] is None
            else (
                result["ratios"][key] < bound
                if key.startswith("train_head")
                else result["ratios"][key] >= bound
            )
        )
        for key, bound in TARGETS.items()
    }
    return result


# The stages fastai's run covers (it reads the split and ends with TTA), in pipeline order.
COMPARED_STAGES = ("precompute", "train_head", "lr_find", "finetune", "evaluate")


def versus_fastai(summary: Mapping[str, Any], fastai: Mapping[str, Any]) -> dict[str, Any] | None:
    """Time for visiontune to match fastai's best accuracy, against fastai's whole run.

    The clock runs over the stages fastai's run covers; a stage "matches" once the accuracy
    it reports (head, fine-tune, evaluate with or without TTA) reaches fastai's best.
    """
    if "total_s" not in fastai or "accuracy" not in fastai:
        return None
    target = max(v for v in (fastai.get("accuracy"), fastai.get("accuracy_tta")) if v is not None)
    acc = summary["accuracy"]
    reached = {
        "train_head": acc.get("head"),
        "finetune": acc.get("finetune"),
        "evaluate": max(
            (v for v in (acc.get("evaluate"), acc.get("evaluate_tta")) if v), default=None
        ),
    }
    walls = {row["name"]: row["wall_s"] for row in summary["stages"]}
    elapsed, matched_at, matched_s = 0.0, None, None
    for name in COMPARED_STAGES:
        elapsed += walls.get(name) or 0.0
        if matched_at is None and (reached.get(name) or 0.0) >= target:
            matched_at, matched_s = name, elapsed
    return {
        "fastai_best_accuracy": target,
        "fastai_s": fastai["total_s"],
        "visiontune_s": elapsed,
        "visiontune_vs_fastai": ratio(elapsed, fastai["total_s"]),
        "matched_at": matched_at,
        "time_to_match_s": matched_s,
        "time_to_match_vs_fastai": ratio(matched_s, fastai["total_s"]),
        "target_time_to_match_vs_fastai": 1 / 3,
    }


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "–" if value is None else format(value, spec)


def markdown(name: str, record: Mapping[str, Any]) -> str:
    """A short markdown report of one dataset's benchmark record."""
    s = record["summary"]
    lines = [
        f"# Benchmark: {name}",
        "",
        f"{record['started']} · commit `{record['git']['commit'][:10]}`"
        f"{' (dirty)' if record['git']['dirty'] else ''} · load before "
        f"{record['load_before']} · other work during the run "
        f"{_fmt(record.get('other_load_cores'), '.2f')} cores · "
        f"{'quick' if record['quick'] else 'full'} run"
        + (
            " · **machine busy: throughputs and ratios not representative**"
            if record.get("busy_before") or record.get("busy_during")
            else ""
        ),
        "",
        "| stage | wall s | images | img/s (wall) | img/s (stage) | CPU s | peak RSS MiB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in s["stages"]:
        lines.append(
            f"| {row['name']} | {_fmt(row['wall_s'])} | {_fmt(row['images'], 'd')} | "
            f"{_fmt(row['images_per_s_wall'])} | {_fmt(row['images_per_s_reported'])} | "
            f"{_fmt(row['cpu_s'])} | {_fmt(row['peak_rss_mb'], '.0f')} |"
        )
    lines += [f"| **total** | {_fmt(s['total_wall_s'])} | | | | | |", ""]
    acc = s["accuracy"]
    lines += [
        "| accuracy | logistic baseline | head | fine-tune | evaluate | evaluate + TTA |",
        "|---|---:|---:|---:|---:|---:|",
        f"| visiontune | {_fmt(acc.get('baseline'), '.2%')} | {_fmt(acc['head'], '.2%')} | "
        f"{_fmt(acc['finetune'], '.2%')} | {_fmt(acc['evaluate'], '.2%')} | "
        f"{_fmt(acc['evaluate_tta'], '.2%')} |",
    ]
    fa = record.get("fastai")
    if fa and "accuracy" in fa:
        lines.append(
            f"| fastai {fa['fastai_version']} | | | | {_fmt(fa['accuracy'], '.2%')} | "
            f"{_fmt(fa['accuracy_tta'], '.2%')} |"
        )
    walls = {row["name"]: row["wall_s"] for row in s["stages"]}
    baseline_s = (record.get("baseline") or {}).get("seconds")
    lines += [
        "",
        "| wall s | logistic baseline | head (train_head) | fine-tune (lr_find + finetune) "
        "| evaluate + TTA |",
        "|---|---:|---:|---:|---:|",
        f"| {name} | {_fmt(baseline_s)} | {_fmt(walls.get('train_head'))} | "
        f"{_fmt((walls.get('lr_find') or 0) + (walls.get('finetune') or 0))} | "
        f"{_fmt(walls.get('evaluate'))} |",
    ]
    lines.append("")
    limits = record.get("limits")
    if limits:
        lines += [
            f"Limits ({limits['backbone']}, {limits['image_size']} px, {limits['precision']}, "
            f"channels_last={limits['channels_last']}, {limits['torch_threads']} torch threads, "
            f"{limits['cpu_model']}):",
            "",
            "| limit | batch | img/s |",
            "|---|---:|---:|",
        ]
        for bs, fwd in limits["forward"].items():
            lines.append(f"| forward | {bs} | {_fmt(fwd['images_per_s'])} |")
        ts = limits["train_step"]
        lines.append(f"| train step | {ts['batch_size']} | {_fmt(ts['images_per_s'])} |")
        for key, dec in limits["decode"].items():
            lines.append(
                f"| decode {key} ({dec['num_workers']} workers) | {dec['batch_size']} | "
                f"{_fmt(dec['images_per_s'])} |"
            )
        used = s.get("limits_used") or {}
        if any(u["source"] != "start of run" for u in used.values()):
            lines += [
                "",
                "Each ratio's limit, re-measured next to its stage (the host's speed drifts):",
                "",
                "| stage | limit | at start | before | after | used |",
                "|---|---|---:|---:|---:|---:|",
            ]
            for stage, u in used.items():
                kind = "train step" if stage == "finetune" else "forward"
                lines.append(
                    f"| {stage} | {kind} | {_fmt(u['at_start'])} | {_fmt(u.get('before'))} | "
                    f"{_fmt(u.get('after'))} | {_fmt(u['images_per_s'])} |"
                )
        lines += ["", "| ratio | measured | target |", "|---|---:|---:|"]
        for key, value in s["ratios"].items():
            bound = TARGETS.get(key)
            target = (
                ""
                if bound is None
                else (f"< {bound}" if key.startswith("train_head") else f"≥ {bound}")
            )
            lines.append(f"| {key} | {_fmt(value, '.3f')} | {target} |")
        lines.append("")
    versus = versus_fastai(s, fa) if fa else None
    if versus:
        matched = (
            f"matched fastai's best {versus['fastai_best_accuracy']:.2%} after "
            f"{versus['matched_at']} at {_fmt(versus['time_to_match_s'])} s (ratio "
            f"{_fmt(versus['time_to_match_vs_fastai'], '.3f')}, target ≤ 0.333)"
            if versus["matched_at"]
            else f"did not reach fastai's best {versus['fastai_best_accuracy']:.2%}"
        )
        lines += [
            f"fastai fine_tune({fa['epochs']}, freeze_epochs={fa['freeze_epochs']}) + tta: "
            f"{_fmt(fa['total_s'])} s ({fa['precision']}); visiontune precompute→evaluate: "
            f"{_fmt(versus['visiontune_s'])} s (ratio "
            f"{_fmt(versus['visiontune_vs_fastai'], '.2f')}); visiontune {matched}.",
            "",
        ]
    elif fa:
        lines += [f"fastai reference: {fa.get('error', 'not run')}", ""]
    return "\n".join(lines)
