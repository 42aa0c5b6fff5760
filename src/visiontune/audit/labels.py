"""Suspect labels: cleanlab on out-of-sample probabilities of a logistic regression over the
cached features. Train images get the fold model that held them out, valid images the fold
models' mean: no label judges itself, and no valid label decides a train image's flag."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from cleanlab.count import num_label_issues
from cleanlab.filter import find_label_issues
from cleanlab.rank import get_label_quality_scores
from scipy.special import softmax
from sklearn.exceptions import ConvergenceWarning
from sklearn.preprocessing import StandardScaler

from visiontune.train.logreg import LOGREG_CS, cv_folds, fold_scores, search_c

# The probe ranks images, and lbfgs at tol 1e-2 flags the same planted flips as the head's
# 1e-3 (dogscats 118/120, digits 59 against 57/72) in a third to a fifth of the time.
PROBE_TOL = 1.0e-2


@dataclass(frozen=True)
class LabelIssues:
    """The flagged rows of one split, most suspect (lowest label quality) first."""

    rows: np.ndarray  # row indices into the split
    suggested: np.ndarray  # the class the probabilities favour
    quality: np.ndarray  # cleanlab's label quality in [0, 1]: low = suspect
    estimated: int  # cleanlab's calibrated estimate of the split's number of label errors


@dataclass(frozen=True)
class OutOfSampleProbs:
    train: np.ndarray  # [N_train, K] from the fold that held each row out
    valid: np.ndarray  # [N_valid, K] the mean of the fold models
    C: float


def out_of_sample_probs(
    train_x: np.ndarray, train_y: np.ndarray, valid_x: np.ndarray, num_classes: int, seed: int
) -> OutOfSampleProbs:
    """Probabilities no image's own label took part in, from the fold models of the C search
    (C by cross-validation on train), so that search is the whole cost."""
    # sklearn works in float64: standardise one float64 copy in place (200 MB at 50,000 images).
    train = np.array(train_x, dtype=np.float64, order="C")
    scaler = StandardScaler(copy=False).fit(train)
    scaler.transform(train)
    valid = scaler.transform(np.array(valid_x, dtype=np.float64, order="C"))
    folds = cv_folds(torch.from_numpy(np.asarray(train_y)), seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # tol 1e-2: ranks, not digits
        search = search_c(train, train_y, folds, PROBE_TOL, refit=False)
    best = int(np.argmax(search.scores_.mean(axis=0).ravel()))
    present = search.classes_
    train_probs = np.zeros((len(train_y), num_classes))
    valid_probs = np.zeros((len(valid), num_classes))
    for fold, (_, held_out) in enumerate(folds):
        train_scores = fold_scores(search, fold, best, train[held_out])
        valid_scores = fold_scores(search, fold, best, valid)
        train_probs[np.ix_(held_out, present)] = _probabilities(train_scores)
        valid_probs[:, present] += _probabilities(valid_scores) / len(folds)
    return OutOfSampleProbs(train_probs, valid_probs, float(LOGREG_CS[best]))


def _probabilities(scores: np.ndarray) -> np.ndarray:
    if scores.shape[1] == 1:  # binary: sklearn's one row is the second class's logit
        p = 1.0 / (1.0 + np.exp(-scores[:, 0]))
        return np.stack([1.0 - p, p], axis=1)
    return softmax(scores, axis=1)


def label_issues(labels: np.ndarray, probs: np.ndarray, filter_by: str) -> LabelIssues:
    """cleanlab's flagged rows, ranked by self-confidence, with its calibrated count."""
    if len(labels) == 0 or len(np.unique(labels)) < 2:
        empty = np.zeros(0, dtype=np.int64)
        return LabelIssues(empty, empty, np.zeros(0), 0)
    # Classes this split lacks would make cleanlab's per-class estimates undefined.
    present = np.unique(labels)
    local = np.searchsorted(present, labels)
    sub = probs[:, present]
    sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ranked = find_label_issues(
            local, sub, filter_by=filter_by, return_indices_ranked_by="self_confidence"
        )
        estimated = num_label_issues(local, sub)
    quality = get_label_quality_scores(local, sub)
    suggested = present[sub[ranked].argmax(axis=1)] if len(ranked) else ranked
    return LabelIssues(np.asarray(ranked), suggested, quality[ranked], int(estimated))
