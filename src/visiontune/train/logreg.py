"""The head's linear layer fitted as the convex problem it is: L2 logistic regression on
standardised train features (in eval mode BN → dropout → Linear is exactly that), C by CV."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler
from torch import nn

# The C grid (inverse L2 strength on standardised features): the best C found on the
# demo and far-domain sets spans 1e-3 (dogscats, 2 classes) to 1 (dogbreeds, 120 classes).
LOGREG_CS = tuple(float(c) for c in np.logspace(-4, 1, 6))
CV_FOLDS = 3  # of the CV that picks C (and, with head.init auto, the init)
# lbfgs stops at this relative improvement: 1e-3 picks the same C as 1e-4 on the suite
# in a fifth of the iterations (dogbreeds: 45 against 260).
LOGREG_TOL = 1.0e-3
LOGREG_MAX_ITER = 500
# The C search runs on at most this many train rows, the final fit on all: sklearn's C
# multiplies the summed loss, so the same C regularises each of more rows less, as it should.
CV_MAX_ROWS = 10_000

Folds = list[tuple[np.ndarray, np.ndarray]]


@dataclass(frozen=True)
class LogRegFit:
    """A fitted multinomial logistic regression on standardised features."""

    mean: torch.Tensor  # [D] train feature means
    scale: torch.Tensor  # [D] train feature standard deviations (1 where constant)
    weight: torch.Tensor  # [K, D] on standardised features
    bias: torch.Tensor  # [K]
    C: float
    cv_loss: float  # mean log loss over the folds at C
    cv_acc: float
    converged: bool


def cv_folds(y: torch.Tensor, seed: int) -> Folds:
    """Shuffled folds of the train rows: stratified when every class has `CV_FOLDS` rows."""
    labels = y.numpy()
    counts = np.bincount(labels)
    splitter = (
        StratifiedKFold(CV_FOLDS, shuffle=True, random_state=seed)
        if counts[counts > 0].min() >= CV_FOLDS
        else KFold(CV_FOLDS, shuffle=True, random_state=seed)  # dogbreeds: 1-2 rows of some
    )
    return list(splitter.split(np.zeros((len(labels), 1)), labels))


def search_c(
    x: np.ndarray, y: np.ndarray, folds: Folds, tol: float, refit: bool
) -> LogisticRegressionCV:
    """sklearn's search over LOGREG_CS on `folds`, by held-out log loss; `refit`: then on all
    rows at the best C."""
    return LogisticRegressionCV(
        Cs=list(LOGREG_CS),
        cv=folds,
        scoring="neg_log_loss",
        l1_ratios=(0.0,),
        use_legacy_attributes=False,
        max_iter=LOGREG_MAX_ITER,
        tol=tol,
        refit=refit,
    ).fit(x, y)


def fold_scores(search: LogisticRegressionCV, fold: int, best: int, x: np.ndarray) -> np.ndarray:
    """The logits of rows `x` by the model `fold` fitted at the C of index `best` (binary: one
    column, the second class's)."""
    path = search.coefs_paths_[fold, 0, best]  # [K', D + 1]: weights, then intercept
    return x @ path[:, :-1].T + path[:, -1]


def fit_logreg(x: torch.Tensor, y: torch.Tensor, num_classes: int, seed: int) -> LogRegFit:
    """Standardise train features, pick C by CV, refit on every row; a class without rows
    is never predicted (zero weight, a bias far below the others)."""
    features, labels = x.float().numpy(), y.numpy()
    scaler = StandardScaler().fit(features)
    standard = scaler.transform(features)
    everything = len(labels) <= CV_MAX_ROWS
    cv_x, cv_y = standard, labels  # not standard[all rows]: fancy indexing copies
    if not everything:
        rows = np.sort(np.random.default_rng(seed).choice(len(labels), CV_MAX_ROWS, replace=False))
        cv_x, cv_y = standard[rows], labels[rows]
    folds = cv_folds(torch.from_numpy(cv_y), seed)
    with warnings.catch_warnings(record=True) as caught:
        # Recorded, not shown: `converged` reports it in the metrics.
        warnings.simplefilter("always", ConvergenceWarning)
        search = search_c(cv_x, cv_y, folds, LOGREG_TOL, refit=everything)
        model = search
        if not everything:  # the C search saw a subsample: refit on every row at its C
            model = LogisticRegression(
                C=float(search.C_), max_iter=LOGREG_MAX_ITER, tol=LOGREG_TOL
            ).fit(standard, labels)
    others = [w for w in caught if not issubclass(w.category, ConvergenceWarning)]
    for w in others:  # record=True caught every warning: show all but non-convergence
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    scores = search.scores_.mean(axis=0).ravel()
    best = int(np.argmax(scores))
    coef, intercept = _full_classes(model.coef_, model.intercept_, model.classes_, num_classes)
    return LogRegFit(
        mean=torch.from_numpy(scaler.mean_).float(),
        scale=torch.from_numpy(scaler.scale_).float(),
        weight=torch.from_numpy(coef).float(),
        bias=torch.from_numpy(intercept).float(),
        C=float(search.C_),
        cv_loss=float(-scores[best]),
        cv_acc=_cv_accuracy(search, cv_x, cv_y, folds, best),
        converged=len(others) == len(caught),
    )


def _cv_accuracy(
    search: LogisticRegressionCV, x: np.ndarray, y: np.ndarray, folds: Folds, best: int
) -> float:
    """Accuracy of each fold's model at the chosen C on its held-out rows (mean)."""
    hits = []
    for fold, (_, test) in enumerate(folds):
        scores = fold_scores(search, fold, best, x[test])
        predicted = (scores[:, 0] > 0).astype(int) if scores.shape[1] == 1 else scores.argmax(1)
        hits.append(np.mean(search.classes_[predicted] == y[test]))
    return float(np.mean(hits))


def _full_classes(
    coef: np.ndarray, intercept: np.ndarray, present: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """[num_classes, D] softmax weights from sklearn's (binary: one row) coefficients."""
    if coef.shape[0] == 1:  # binary: sigmoid(w·x + b) = softmax of ±(w·x + b)/2
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    weight = np.zeros((num_classes, coef.shape[1]))
    bias = np.full(num_classes, intercept.min() - 20.0)  # absent classes: never predicted
    weight[present] = coef
    bias[present] = intercept
    return weight, bias


@torch.no_grad()
def init_from_logreg(head: nn.Sequential, fit: LogRegFit) -> None:
    """Set a BN → dropout → Linear head so that in eval mode head(x) is the fit exactly: BN
    holds the train statistics, the Linear absorbs BN's eps in sqrt(var + eps)."""
    norm, linear = head[0], head[-1]
    norm.reset_parameters()
    norm.running_mean.copy_(fit.mean)
    norm.running_var.copy_(fit.scale**2)
    linear.weight.copy_(fit.weight * torch.sqrt(fit.scale**2 + norm.eps) / fit.scale)
    linear.bias.copy_(fit.bias)
