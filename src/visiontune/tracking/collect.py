"""Read a finished stage's DVC outputs (metrics JSON, history/steps/curve CSVs, plots) into
what its MLflow run records: MLflow holds the numbers of `dvc metrics show`, and stages stay
unaware of MLflow."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# The metric namespace of a stage's own scalars, where it is not the stage's name.
NAMESPACES = {"fetch": "data", "train_head": "head", "evaluate": "eval"}
# Per-epoch history columns → metric names. The per-epoch train loss is `train/epoch_loss`
# because `train/loss` is the per-step series in the same run.
EPOCH_NAMES = {
    "train_loss": "train/epoch_loss",
    "valid_loss": "valid/loss",
    "valid_acc": "valid/acc",
}
# The files a stage's run keeps besides config.json and metrics.json (missing ones are skipped).
ARTIFACTS = {
    "fetch": ("rejects.csv",),
    "split": ("report.json",),
    "precompute": ("fingerprint.json", "throughput.json"),
    "train_head": ("history.csv", "layer_groups.json"),
    "finetune": ("history.csv", "layer_groups.json"),
    "lr_find": ("curve.csv", "suggestion.json"),
    "evaluate": ("per_class.csv", "predictions.csv"),
}

Series = dict[str, list[tuple[int, float]]]


@dataclass
class StageRecord:
    """What one stage logs: its run's params, metrics, series, artifacts, tags; parent metrics."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    series: Series = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    parent_metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def flatten_mapping(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`; lists become JSON strings, and so does a mapping
    keyed by URLs (`data.mirrors`): a URL is no MLflow name."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and not any("://" in str(k) for k in value):
            flat.update(flatten_mapping(value, f"{name}{sep}", sep))
        elif isinstance(value, Mapping | list | tuple):
            flat[name] = json.dumps(value)
        else:
            flat[name] = value
    return flat


def numeric(data: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The numbers of a (nested) JSON object as `prefix/key/subkey` metrics."""
    flat = flatten_mapping(data, f"{prefix}/", sep="/")
    return {
        key: float(value)
        for key, value in flat.items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }


def epoch_metric_name(column: str) -> str:
    """The MLflow name of a per-epoch history column (`valid_acc` → `valid/acc`)."""
    return EPOCH_NAMES.get(column, f"epoch/{column}")


def _step_metric_name(column: str) -> str | None:
    if column.startswith("lr_group"):
        return f"lr/group{column.removeprefix('lr_group')}"
    return None if column == "epoch" else f"train/{column}"


def _json(path: Path) -> dict[str, Any]:
    data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    return data if isinstance(data, dict) else {}


def _series(path: Path, index: str, name: Callable[[str], str | None]) -> Series:
    """Each numeric column of CSV `path` but `index` as a series over `index` (else the row
    number), named by `name` (None: not a series); {} when the file is missing."""
    if not path.is_file():
        return {}
    frame = pd.read_csv(path)
    steps = frame[index].astype(int) if index in frame else pd.Series(range(len(frame)))
    return {
        metric: list(zip(steps, frame[column].astype(float), strict=True))
        for column in frame.select_dtypes("number").columns
        if column != index and (metric := name(column)) is not None
    }


def collect(stage: str, out_dir: Path) -> StageRecord:
    """Gather what `stage` logs from its output folder `out_dir` (missing files are skipped)."""
    namespace = NAMESPACES.get(stage, stage)
    config, metrics = _json(out_dir / "config.json"), _json(out_dir / "metrics.json")
    record = StageRecord(
        params=flatten_mapping(config),
        metrics=numeric(metrics, namespace),
        artifacts=[
            (out_dir / name, None)
            for name in ("config.json", "metrics.json", *ARTIFACTS.get(stage, ()))
        ],
    )
    # train_head's choices (what the head started from and why, whether a mirror image
    # keeps its class), searchable as tags.
    for key in ("init", "init_reason", "domain", "mirror_symmetric"):
        value = metrics.get(key)
        if isinstance(value, bool):
            value = str(value).lower()
        if isinstance(value, str):
            record.tags[f"{namespace}.{key}"] = value

    if stage == "fetch":  # the counts of manifest.csv and rejects.csv, from its summary
        summary = config.get("fetch", {})
        for metric, key in (("images", "images"), ("classes", "classes"), ("rejects", "rejected")):
            if key in summary:
                record.metrics[f"data/{metric}"] = float(summary[key])
    elif stage == "split":
        record.metrics.update(numeric(_json(out_dir / "report.json"), namespace))
    elif stage == "precompute":
        record.params.update(flatten_mapping(_json(out_dir / "fingerprint.json"), "fingerprint."))
        record.metrics.update(numeric(_json(out_dir / "throughput.json"), namespace))
    elif stage in ("train_head", "finetune"):
        record.series.update(_series(out_dir / "history.csv", "epoch", epoch_metric_name))
        record.series.update(_series(out_dir / "steps.csv", "step", _step_metric_name))
        record.parent_metrics = {k: v for k, v in record.metrics.items() if "acc" in k}
    elif stage == "lr_find":
        record.series.update(_series(out_dir / "curve.csv", "step", lambda c: f"lr_find/{c}"))
        # Not `lr_find/lr`: that name is the curve's LR series.
        suggested = numeric(_json(out_dir / "suggestion.json"), f"{namespace}/suggested")
        record.metrics.update(suggested)
        record.parent_metrics.update(suggested)
    elif stage in ("report", "audit"):
        for path in sorted(out_dir.glob("*")):
            if path.suffix in (".png", ".csv", ".md", ".svg", ".html"):
                record.artifacts.append((path, stage))
    if stage in ("evaluate", "audit"):  # audit's counts, beside the accuracy they qualify
        record.parent_metrics = dict(record.metrics)
    return record
