"""Read a finished stage's DVC outputs into what its MLflow run records.

Tracking mirrors the files DVC owns (metrics JSON, history/steps/curve CSVs, plots), so
the numbers in MLflow are the numbers in `dvc metrics show`, and stages stay unaware of MLflow.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

# Metric namespace of each stage's own scalars (metrics.json and friends).
NAMESPACES = {
    "fetch": "data",
    "split": "split",
    "precompute": "precompute",
    "audit": "audit",
    "train_head": "head",
    "lr_find": "lr_find",
    "finetune": "finetune",
    "evaluate": "eval",
    "report": "report",
}
# Per-epoch history columns → metric names. The per-epoch train loss is `train/epoch_loss`
# because `train/loss` is the per-step series in the same run.
EPOCH_NAMES = {
    "train_loss": "train/epoch_loss",
    "valid_loss": "valid/loss",
    "valid_acc": "valid/acc",
    "valid_accuracy": "valid/acc",
}


@dataclass
class StageRecord:
    """Everything one stage logs: child params/metrics/series/artifacts and parent metrics."""

    params: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    artifacts: list[tuple[Path, str | None]] = field(default_factory=list)
    parent_metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)


def flatten_mapping(data: Mapping[str, Any], prefix: str = "", sep: str = ".") -> dict[str, Any]:
    """`{"a": {"b": 1}}` → `{"a.b": 1}`; lists become strings.

    A mapping keyed by URLs (`data.mirrors`: URL → local copies) stays one value, a JSON
    string: a URL is no MLflow name.
    """
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


def _json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def epoch_metric_name(column: str) -> str:
    """The MLflow name of a per-epoch history column (`valid_acc` → `valid/acc`)."""
    return EPOCH_NAMES.get(column, f"epoch/{column}")


def _epoch_series(history: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
    steps = history["epoch"] if "epoch" in history else pd.Series(range(len(history)))
    series = {}
    for column in history.select_dtypes("number").columns:
        if column == "epoch":
            continue
        series[epoch_metric_name(column)] = list(
            zip(steps.astype(int), history[column].astype(float), strict=True)
        )
    return series


def _step_series(steps: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
    index = steps["step"].astype(int)
    series = {}
    for column in steps.select_dtypes("number").columns:
        if column in ("step", "epoch"):
            continue
        if column.startswith("lr_group"):
            name = f"lr/group{column.removeprefix('lr_group')}"
        elif column == "loss":
            name = "train/loss"
        else:
            name = f"train/{column}"
        series[name] = list(zip(index, steps[column].astype(float), strict=True))
    return series


def _lr_find_series(curve: pd.DataFrame) -> dict[str, list[tuple[int, float]]]:
    index = curve["step"].astype(int) if "step" in curve else pd.Series(range(len(curve)))
    return {
        f"lr_find/{column}": list(zip(index, curve[column].astype(float), strict=True))
        for column in curve.select_dtypes("number").columns
        if column != "step"
    }


def collect(
    stage: str, out_dir: Path, extra_metrics: Mapping[str, float] | None = None
) -> StageRecord:
    """Gather what `stage` logs from its output folder `out_dir` (missing files are skipped)."""
    namespace = NAMESPACES.get(stage, stage)
    record = StageRecord()
    config = _json(out_dir / "config.json")
    if isinstance(config, Mapping):
        record.params = flatten_mapping(config)
        record.artifacts.append((out_dir / "config.json", None))
    metrics = _json(out_dir / "metrics.json")
    if isinstance(metrics, Mapping):
        record.metrics.update(numeric(metrics, namespace))
        record.artifacts.append((out_dir / "metrics.json", None))
        # What the head started from and why, and whether a mirror image keeps its class
        # (train_head's choices), searchable as tags.
        for key in ("init", "init_reason", "domain", "mirror_symmetric"):
            value = metrics.get(key)
            if isinstance(value, bool):
                value = "true" if value else "false"
            if isinstance(value, str):
                record.tags[f"{namespace}.{key}"] = value
    for key, value in (extra_metrics or {}).items():
        record.metrics[key if "/" in key else f"{namespace}/{key}"] = float(value)

    if stage == "fetch":
        manifest = out_dir / "manifest.csv"
        if manifest.is_file():
            frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
            record.metrics["data/images"] = float(len(frame))
            record.metrics["data/classes"] = float(frame["label"].nunique())
        rejects = out_dir / "rejects.csv"
        if rejects.is_file():
            record.metrics["data/rejects"] = float(len(pd.read_csv(rejects)))
        record.artifacts.append((rejects, None))
    elif stage == "split":
        report = _json(out_dir / "report.json")
        if isinstance(report, Mapping):
            record.metrics.update(numeric(report, namespace))
        record.artifacts.append((out_dir / "report.json", None))
    elif stage == "precompute":
        fingerprint = _json(out_dir / "fingerprint.json")
        if isinstance(fingerprint, Mapping):
            record.params.update(flatten_mapping(fingerprint, "fingerprint."))
        throughput = _json(out_dir / "throughput.json")
        if isinstance(throughput, Mapping):
            record.metrics.update(numeric(throughput, namespace))
        record.artifacts += [
            (out_dir / "fingerprint.json", None),
            (out_dir / "throughput.json", None),
        ]
    elif stage in ("train_head", "finetune"):
        history = out_dir / "history.csv"
        if history.is_file():
            record.series.update(_epoch_series(pd.read_csv(history)))
            record.artifacts.append((history, None))
        steps = out_dir / "steps.csv"
        if steps.is_file():
            record.series.update(_step_series(pd.read_csv(steps)))
        record.artifacts.append((out_dir / "layer_groups.json", None))
        record.parent_metrics = {k: v for k, v in record.metrics.items() if "acc" in k}
    elif stage == "lr_find":
        curve = out_dir / "curve.csv"
        if curve.is_file():
            record.series.update(_lr_find_series(pd.read_csv(curve)))
            record.artifacts.append((curve, None))
        suggestion = _json(out_dir / "suggestion.json")
        if isinstance(suggestion, Mapping):
            # Not `lr_find/lr`: that name is the curve's LR series.
            suggested = numeric(suggestion, f"{namespace}/suggested")
            record.metrics.update(suggested)
            record.parent_metrics.update(suggested)
            record.artifacts.append((out_dir / "suggestion.json", None))
    elif stage == "evaluate":
        record.parent_metrics = dict(record.metrics)
        for name in ("per_class.csv", "predictions.csv"):
            record.artifacts.append((out_dir / name, None))
    elif stage in ("report", "audit"):
        for path in sorted(out_dir.iterdir()) if out_dir.is_dir() else []:
            if path.suffix in (".png", ".csv", ".md", ".svg", ".html"):
                record.artifacts.append((path, stage))
        if stage == "audit":  # the counts, beside the accuracy they qualify
            record.parent_metrics = dict(record.metrics)
    return record
