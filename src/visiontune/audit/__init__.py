"""The data audit: suspect labels, near-duplicates and outliers, from the feature cache. It
decides nothing: a person acts on the findings with `data.exclude` and `data.relabel`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import pandas as pd

from visiontune.audit.labels import label_issues, out_of_sample_probs
from visiontune.audit.neighbours import Neighbours, nearest, unit_rows
from visiontune.config import AuditParams
from visiontune.train.logreg import CV_FOLDS

FINDING_COLUMNS = (
    "kind",  # label | duplicate | outlier
    "path",  # as under the source (the manifest's path without images/)
    "given_label",
    "suggested_label",  # label: the class the out-of-sample fit favours
    "score",  # label: 1 − cleanlab's label quality; duplicate: similarity; outlier: robust z
    "other_path",  # duplicate: the other image of the pair
    "split",
    "other_split",
    "id",  # SHA-256 of the file: what data.exclude and data.relabel take
    "other_id",
    "other_label",
)
# cleanlab's default: flag where disagreement exceeds the class pair's estimated noise rate.
LABEL_FILTER = "prune_by_noise_rate"
DROPPED = "dropped by fetch"  # other_split of an identical file fetch dropped (see rejects.csv)
MIN_PROBE_ROWS = 2 * CV_FOLDS  # two train images per fold of the label probe's CV
NEIGHBOURS = 10  # an image's neighbourhood (duplicates) and isolation (outliers)


@dataclass(frozen=True)
class AuditImages:
    """The train and valid images in feature-cache row order (the split tables' order)."""

    paths: list[str]  # train rows, then valid rows
    labels: np.ndarray  # class index per row
    splits: list[str]  # "train" | "valid" per row
    ids: list[str]  # file SHA-256 per row
    n_train: int


@dataclass(frozen=True)
class Audit:
    findings: pd.DataFrame  # FINDING_COLUMNS, labels first, each kind most suspect first
    metrics: dict[str, Any]


def audit_features(
    train_x: np.ndarray,
    valid_x: np.ndarray,
    images: AuditImages,
    classes: list[str],
    params: AuditParams,
    seed: int,
    dropped: Sequence[tuple[str, str]] = (),
) -> Audit:
    """Every finding of the audit, and its counts (the stage's DVC metrics). `dropped`: the
    (kept, dropped) paths of identical files fetch kept one of: duplicates of score 1."""
    n_train = images.n_train
    train_y = images.labels[:n_train]
    finding = partial(_finding, images, classes)
    rows: list[dict[str, Any]] = []
    flagged = {"train": 0, "valid": 0}
    estimated = 0
    probs = None
    # Cross-validation needs a few train images and two classes: fewer get no label findings.
    if len(train_y) >= MIN_PROBE_ROWS and len(np.unique(train_y)) >= 2:
        probs = out_of_sample_probs(train_x, train_y, valid_x, len(classes), seed)
        for split, offset, p in (("train", 0, probs.train), ("valid", n_train, probs.valid)):
            issues = label_issues(images.labels[offset : offset + len(p)], p, LABEL_FILTER)
            flagged[split] = len(issues.rows)
            estimated += issues.estimated
            found = zip(issues.rows, issues.suggested, issues.quality, strict=True)
            for row, suggested, quality in found:
                label, score = classes[int(suggested)], 1.0 - float(quality)
                rows.append(finding("label", offset + int(row), score, suggested_label=label))

    unit = unit_rows(np.concatenate([train_x, valid_x]), train_x.mean(axis=0))
    neighbours = nearest(unit, NEIGHBOURS + 1)
    pairs = duplicate_pairs(neighbours, params.duplicate_threshold)
    rows += [finding("duplicate", i, score, other=j) for i, j, score in pairs]
    row_of = {path: row for row, path in enumerate(images.paths)}
    listed = [(row_of[kept], copy) for kept, copy in dropped if kept in row_of]
    for row, copy in listed:
        rows.append(finding("duplicate", row, 1.0) | {"other_path": copy, "other_split": DROPPED})
    # Isolation, 1 − mean cosine to the nearest images, as a robust z.
    z = robust_z(1.0 - neighbours.similarity[:, :NEIGHBOURS].mean(axis=1))
    outliers = [row for row in np.argsort(-z, kind="stable") if z[row] >= params.outlier_threshold]
    rows += [finding("outlier", int(row), float(z[row])) for row in outliers]
    leaks = sum(images.splits[i] != images.splits[j] for i, j, _ in pairs)
    accuracy = None if probs is None else float((probs.train.argmax(axis=1) == train_y).mean())
    metrics = {
        "label_issues": flagged["train"] + flagged["valid"],
        "label_issues_train": flagged["train"],
        "label_issues_valid": flagged["valid"],
        # cleanlab's estimate of the number of wrong labels, calibrated to the label counts.
        "label_issues_estimated": estimated,
        "duplicate_pairs": len(pairs),
        "duplicate_pairs_across_splits": leaks,
        "identical_files_dropped": len(listed),
        "outliers": len(outliers),
        # How far to trust the label findings: the probe's accuracy on held-out train rows.
        "probe_cv_accuracy": None if accuracy is None else round(accuracy, 4),
        "probe_C": None if probs is None else probs.C,
        "images": len(images.paths),
    }
    return Audit(pd.DataFrame(rows, columns=list(FINDING_COLUMNS)), metrics)


def duplicate_pairs(neighbours: Neighbours, threshold: float) -> list[tuple[int, int, float]]:
    """Pairs much more alike than either image is to its other neighbours, most alike first:
    how far the cosine stands above the larger of the two images' mean cosine to their 2nd-11th
    nearest (the 1st may be the copy), as a share of the way to 1. Raw cosine cannot tell a
    copy from two photos of one breed on one lawn (some classes are tight clusters)."""
    background = neighbours.similarity[:, 1 : NEIGHBOURS + 1].mean(axis=1)
    # Candidates: each pair where one is among the other's 3 nearest.
    cosines: dict[tuple[int, int], float] = {}
    for i, others in enumerate(neighbours.index[:, :3].tolist()):
        for j, cosine in zip(others, neighbours.similarity[i, :3].tolist(), strict=True):
            cosines[(min(i, j), max(i, j))] = cosine
    scored = []
    for (i, j), cosine in cosines.items():
        base = max(background[i], background[j])
        score = (cosine - base) / max(1.0 - base, 1e-6)
        if score >= threshold:
            scored.append((i, j, float(score)))
    return sorted(scored, key=lambda p: (-p[2], p[0], p[1]))


def robust_z(values: np.ndarray) -> np.ndarray:
    """(value − median) / (1.4826 · MAD): a z-score that the outliers themselves do not move."""
    median = np.median(values)
    mad = 1.4826 * np.median(np.abs(values - median))
    return (values - median) / max(mad, 1e-12)


def _finding(
    images: AuditImages,
    classes: list[str],
    kind: str,
    row: int,
    score: float,
    *,
    suggested_label: str = "",
    other: int | None = None,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "path": images.paths[row],
        "given_label": classes[int(images.labels[row])],
        "suggested_label": suggested_label,
        "score": round(score, 4),
        "other_path": images.paths[other] if other is not None else "",
        "split": images.splits[row],
        "other_split": images.splits[other] if other is not None else "",
        "id": images.ids[row],
        "other_id": images.ids[other] if other is not None else "",
        "other_label": classes[int(images.labels[other])] if other is not None else "",
    }
