"""Deterministic, stratified train/valid split of the fetch manifest: each class on its own,
ranked by a seeded hash of the paths, so adding an image never reshuffles the others."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from visiontune.config import SplitParams
from visiontune.data.manifest import SPLIT_COLUMNS, seeded_rank, sorted_rows


@dataclass(frozen=True)
class Split:
    train: pd.DataFrame  # path, label (sorted by path)
    valid: pd.DataFrame
    classes: list[str]  # the classes kept, sorted
    report: dict[str, Any]


def n_valid_for(n_images: int, valid_pct: float) -> int:
    """The rounded share of a class's images, at least one, and never all of them (a class
    needs a training image)."""
    if n_images < 2:
        return 0
    return min(max(round(n_images * valid_pct), 1), n_images - 1)


def split_manifest(manifest: pd.DataFrame, params: SplitParams) -> Split:
    """Split a manifest (path, label, split_hint) into train and valid tables.

    Rows hinted `test` are held out. With `params.keep_predefined` and a source that has
    both train and valid folders, the hints are the split; rows without a hint are split
    per class by `valid_pct`. Classes with fewer than `min_per_class` usable images
    are dropped and listed in the report.
    """
    usable = manifest[manifest["split_hint"] != "test"]
    counts = usable["label"].value_counts()
    dropped = {str(k): int(v) for k, v in sorted(counts.items()) if v < params.min_per_class}
    usable = usable[~usable["label"].isin(list(dropped))]
    predefined = params.keep_predefined and {"train", "valid"} <= set(usable["split_hint"])
    train_parts: list[pd.DataFrame] = []
    valid_parts: list[pd.DataFrame] = []
    for _, rows in usable.groupby("label", sort=True):
        if predefined:
            train_parts.append(rows[rows["split_hint"] == "train"])
            valid_parts.append(rows[rows["split_hint"] == "valid"])
            rows = rows[rows["split_hint"] == ""]
        ranked = sorted(rows["path"], key=lambda path: seeded_rank(params.seed, path))
        in_valid = rows["path"].isin(ranked[: n_valid_for(len(ranked), params.valid_pct)])
        train_parts.append(rows[~in_valid])
        valid_parts.append(rows[in_valid])

    empty = pd.DataFrame(columns=list(SPLIT_COLUMNS))
    train = sorted_rows(pd.concat([empty, *train_parts]), SPLIT_COLUMNS)
    valid = sorted_rows(pd.concat([empty, *valid_parts]), SPLIT_COLUMNS)
    classes = sorted(set(usable["label"]))
    sizes = {"train": train["label"].value_counts(), "valid": valid["label"].value_counts()}
    per_class = {
        label: {part: int(n.get(label, 0)) for part, n in sizes.items()} for label in classes
    }
    warnings = [
        f"class {label!r} has no {part} images"
        for label, count in per_class.items()
        for part in ("train", "valid")
        if count[part] == 0
    ]
    report = {
        "mode": "predefined" if predefined else "stratified",
        "valid_pct": params.valid_pct,
        "seed": params.seed,
        "min_per_class": params.min_per_class,
        "train": len(train),
        "valid": len(valid),
        "classes": len(classes),
        "test_held_out": int((manifest["split_hint"] == "test").sum()),
        "dropped_classes": dropped,
        "per_class": per_class,
        "warnings": warnings,
    }
    return Split(train=train, valid=valid, classes=classes, report=report)
