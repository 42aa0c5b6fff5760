"""How the head starts, chosen on train features alone: `head.init: auto` keeps the source
classifier or the logistic fit, whichever has the lower held-out log loss on the same folds."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
import pandas as pd
import torch

from visiontune.config import HeadParams
from visiontune.features import FeatureSet
from visiontune.models.head import create_head
from visiontune.models.record import DataConfig, ModelInfo
from visiontune.train.head import HeadResult, evaluate_head, train_head
from visiontune.train.logreg import CV_FOLDS, LogRegFit, cv_folds, fit_logreg, init_from_logreg
from visiontune.train.mirror import mirror_symmetry

Route = Literal["auto", "source", "logreg", "random"]

# The untrained source start within this share of the logistic fit's CV accuracy: the classes
# are ImageNet-like ("near"). Measured: dogscats 0.98, dogbreeds 1.2; digits 0.33, defects 0.53.
NEAR_DOMAIN_SHARE = 0.9
# A logistic head's regularisation is its CV-chosen C: dropout 0.5 on it cost a one-epoch
# digits fine-tune 1.9-5.3 points over five seeds, first undoing the fit.
LOGREG_DROPOUT = 0.0


def resolve_head_init(
    params: HeadParams, source: tuple[torch.Tensor, torch.Tensor] | None, backbone: str
) -> Route:
    """The start `params.init` asks for, given what the weights carry: `auto` (choose by CV)
    needs a source classifier, else `logreg`; hidden layers (neither start fits) get `random`."""
    if params.init == "source" and source is None:
        raise ValueError(
            f"head.init: source, but the weights of {backbone} carry no classifier that sits "
            "on the pooled features; allowed: auto, logreg, random"
        )
    if params.hidden:
        return "random"
    if params.init == "auto":
        return "auto" if source is not None else "logreg"
    return params.init


def cross_validate_source(
    x: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    params: HeadParams,
    source: tuple[torch.Tensor, torch.Tensor],
    seed: int,
) -> tuple[float, float, float]:
    """Mean held-out log loss and accuracy of the source route (start + SGD epochs) over the
    folds, and the accuracy of the start alone."""
    scores = []
    for train, test in cv_folds(y, seed):
        fold = train_head(
            x[train], y[train], x[test], y[test], num_classes, params, seed=seed, source=source
        ).metrics
        scores.append((fold["valid_loss"], fold["valid_acc"], fold["init_valid_acc"]))
    loss, acc, start_acc = (float(v) for v in np.mean(scores, axis=0))
    return loss, acc, start_acc


def logreg_head(features: FeatureSet, fit: LogRegFit) -> HeadResult:
    """The head holding a logistic-regression fit, with its train and valid scores."""
    x = features.train_x.float()
    head = create_head(x.shape[1], len(features.classes), (), LOGREG_DROPOUT)
    init_from_logreg(head, fit)
    train_loss, train_acc = evaluate_head(head, x, features.train_y)
    valid_loss, valid_acc = evaluate_head(head, features.valid_x.float(), features.valid_y)
    scores = {"train_loss": train_loss, "train_acc": train_acc}
    scores |= {"valid_loss": valid_loss, "valid_acc": valid_acc}
    metrics = {
        **scores,
        "epochs": 0,
        "init": "logreg",
        "logreg_C": fit.C,
        "logreg_converged": fit.converged,
        "n_train": len(x),
        "n_valid": len(features.valid_x),
    }
    return HeadResult(head.eval(), pd.DataFrame([{"epoch": 0, **scores}]), metrics, None)


def train_head_on_features(
    features: FeatureSet,
    params: HeadParams,
    seed: int,
    source: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> HeadResult:
    """The head for these cached features, started as `params.init` says (`source`: the
    backbone's pretrained classifier, if any). Its metrics add how the start was chosen and
    whether a mirror image keeps its class (`visiontune.train.mirror`), for `flip: auto`."""
    route = resolve_head_init(params, source, str(features.fingerprint.get("backbone")))
    x, y, k = features.train_x.float(), features.train_y, len(features.classes)
    choice: dict[str, Any] = {}
    fit = fit_logreg(x, y, k, seed) if route in ("auto", "logreg") else None
    if fit is not None:
        choice |= {"logreg_cv_loss": fit.cv_loss, "logreg_cv_acc": fit.cv_acc}
    if route == "auto" and fit is not None and source is not None:
        loss, acc, start_acc = cross_validate_source(x, y, k, params, source, seed)
        choice |= {"source_cv_loss": loss, "source_cv_acc": acc}
        route = "source" if loss < fit.cv_loss else "logreg"
        near = start_acc >= NEAR_DOMAIN_SHARE * fit.cv_acc
        choice |= {"source_start_cv_acc": start_acc, "domain": "near" if near else "far"}
        choice["init_reason"] = (
            f"{CV_FOLDS}-fold CV on train: source log loss {loss:.4f} "
            f"(acc {acc:.4f}, {start_acc:.4f} untrained) vs logreg "
            f"{fit.cv_loss:.4f} (acc {fit.cv_acc:.4f})"
        )
    else:
        choice |= {"init_reason": f"head.init: {params.init}"}
        choice["domain"] = "near" if route == "source" else "far"
    if route == "logreg" and fit is not None:
        result = logreg_head(features, fit)
    else:
        start = source if route == "source" else None
        result = train_head(
            x, y, features.valid_x, features.valid_y, k, params, seed=seed, source=start
        )
    choice |= mirror_symmetry(features, seed).to_metrics()
    return HeadResult(result.head, result.history, {**result.metrics, **choice}, result.lr_find)


def head_record(features: FeatureSet, params: HeadParams, result: HeadResult) -> ModelInfo:
    """The model's record as train_head starts it: what the features were computed with
    (the cache's fingerprint), the head, and the domain and mirror verdicts finetune follows."""
    fingerprint = features.fingerprint
    return ModelInfo(
        backbone=str(fingerprint["backbone"]),
        weights_source=str(fingerprint["weights_source"]),
        weights_sha256=fingerprint["weights_sha256"],
        classes=list(features.classes),
        data_config=DataConfig.from_dict(fingerprint["data_config"]),
        head_in_features=int(features.train_x.shape[1]),
        head_hidden=tuple(params.hidden),
        head_dropout=next(m.p for m in result.head if isinstance(m, torch.nn.Dropout)),
        head_init=result.metrics["init"],
        domain=result.metrics["domain"],
        mirror_symmetric=bool(result.metrics["mirror_symmetric"]),
        mirror=None,
        inference=None,
    )


def describe(metrics: Mapping[str, Any]) -> str:
    """One line on what the head is and how it scores, for the stage's output."""
    how = (
        f"logistic regression (C {metrics['logreg_C']:.2g})"
        if metrics["init"] == "logreg"
        else f"{metrics['init']} init + {metrics['epochs']} epochs at lr {metrics['lr']:.2e}"
    )
    return (
        f"{how} on {metrics['n_train']} features: valid_acc {metrics['valid_acc']:.4f} "
        f"(loss {metrics['valid_loss']:.4f}); {metrics['init_reason']}; "
        f"{metrics['domain']} domain; a mirror image "
        f"{'keeps its class' if metrics['mirror_symmetric'] else 'changes class'} "
        f"({metrics['mirror_lost']} right→wrong, {metrics['mirror_gained']} wrong→right, "
        f"p = {metrics['mirror_p']:.2g})"
    )
