"""The data audit: suspect labels, near-duplicates and outliers, from the feature cache.

It reads what precompute already computed (one feature vector per train and valid image)
and decides nothing: the findings are a table for a person, who may then exclude or
relabel images through `data.exclude` and `data.relabel` (applied by fetch).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from visiontune.audit.labels import label_issues, out_of_sample_probs
from visiontune.audit.neighbours import Neighbours, candidate_pairs, isolation, nearest, unit_rows
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
# cleanlab's default filter: flags where the out-of-sample class disagrees with the given
# one by more than the estimated noise rate of that class pair allows.
LABEL_FILTER = "prune_by_noise_rate"
# other_split of a byte-identical copy that fetch dropped (rejects.csv has it).
DROPPED = "dropped by fetch"
# Train images the label probe needs at least: two per fold of its cross-validation.
MIN_PROBE_ROWS = 2 * CV_FOLDS
# Neighbours that define an image's neighbourhood (duplicates) and its isolation (outliers).
NEIGHBOURS = 10


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
    """Every finding of the audit, and its counts (the stage's DVC metrics).

    `dropped`: (kept, dropped) paths of the byte-identical files fetch kept one of; each
    whose kept image is audited is a duplicate finding too (score 1).
    """
    n_train = images.n_train
    train_y, valid_y = images.labels[:n_train], images.labels[n_train:]
    rows: list[dict[str, Any]] = []
    label_counts = {"train": (0, 0), "valid": (0, 0)}
    probs = None
    # Cross-validation needs a few train images and two classes; a smaller set gets no
    # label findings rather than made-up ones.
    if len(train_y) >= MIN_PROBE_ROWS and len(np.unique(train_y)) >= 2:
        probs = out_of_sample_probs(train_x, train_y, valid_x, len(classes), seed)
        splits = (("train", 0, train_y, probs.train), ("valid", n_train, valid_y, probs.valid))
    else:
        splits = ()
    for split, offset, y, p in splits:
        issues = label_issues(y, p, LABEL_FILTER)
        label_counts[split] = (len(issues.rows), issues.estimated)
        flagged = zip(issues.rows, issues.suggested, issues.quality, strict=True)
        for row, suggested, quality in flagged:
            suggested_label = classes[int(suggested)]
            score = 1.0 - float(quality)
            rows.append(_finding(images, classes, "label", offset + int(row), score,
                                 suggested_label=suggested_label))  # fmt: skip

    unit = unit_rows(np.concatenate([train_x, valid_x]), train_x.mean(axis=0))
    neighbours = nearest(unit, NEIGHBOURS + 1)
    pairs = duplicate_pairs(neighbours, params.duplicate_threshold)
    leaks = 0
    for i, j, score in pairs:
        leaks += images.splits[i] != images.splits[j]
        rows.append(_finding(images, classes, "duplicate", i, score, other=j))
    row_of = {path: row for row, path in enumerate(images.paths)}
    listed = [(row_of[kept], copy) for kept, copy in dropped if kept in row_of]
    for row, copy in listed:
        finding = _finding(images, classes, "duplicate", row, 1.0)
        rows.append(finding | {"other_path": copy, "other_split": DROPPED})
    spread = isolation(neighbours, NEIGHBOURS)
    z = robust_z(spread)
    for row in np.argsort(-z, kind="stable"):
        if z[row] < params.outlier_threshold:
            break
        rows.append(_finding(images, classes, "outlier", int(row), float(z[row])))

    findings = pd.DataFrame(rows, columns=list(FINDING_COLUMNS))
    accuracy = None if probs is None else float((probs.train.argmax(axis=1) == train_y).mean())
    metrics = {
        "label_issues": label_counts["train"][0] + label_counts["valid"][0],
        "label_issues_train": label_counts["train"][0],
        "label_issues_valid": label_counts["valid"][0],
        # cleanlab's estimate of the number of wrong labels, calibrated to the label counts.
        "label_issues_estimated": label_counts["train"][1] + label_counts["valid"][1],
        "duplicate_pairs": len(pairs),
        "duplicate_pairs_across_splits": int(leaks),
        "identical_files_dropped": len(listed),
        "outliers": int((z >= params.outlier_threshold).sum()),
        # How far to trust the label findings: the probe's accuracy on held-out train rows.
        "probe_cv_accuracy": None if accuracy is None else round(accuracy, 4),
        "probe_C": None if probs is None else probs.C,
        "images": len(images.paths),
    }
    return Audit(findings, metrics)


def duplicate_pairs(neighbours: Neighbours, threshold: float) -> list[tuple[int, int, float]]:
    """Pairs much more alike than either image is to its other neighbours.

    The score is how far the pair's cosine stands above the larger of the two images'
    neighbourhoods (the mean cosine to its 2nd to 11th nearest: the first may be the copy),
    as a share of the way to 1. Raw cosine cannot tell a re-encoded copy from two photos of
    one breed on one lawn, since some classes are tight clusters; measured against its own
    neighbourhood it can.
    """
    background = neighbours.similarity[:, 1 : NEIGHBOURS + 1].mean(axis=1)
    candidates = candidate_pairs(neighbours, top=3)
    scored = []
    for i, j, cosine in candidates:
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
