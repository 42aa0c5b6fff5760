"""How the head starts: a logistic fit that is exact, and a choice made on train folds alone."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from real_config import default_section
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

from visiontune.config import HeadParams
from visiontune.features import FeatureSet
from visiontune.models.head import create_head
from visiontune.train.head_choice import train_head_on_features
from visiontune.train.logreg import cv_folds, fit_logreg, init_from_logreg


def blobs(n: int, classes: int, dim: int = 12, seed: int = 0, offset: float = 4.0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.arange(n) % classes
    return centers[y] + torch.randn(n, dim, generator=g) + offset, y


def split(x, y, classes, n_train):
    names = [f"c{i}" for i in range(classes)]
    return FeatureSet(x[:n_train], y[:n_train], x[n_train:], y[n_train:], names, {"backbone": "t"})


def test_the_logistic_head_is_the_fitted_model_exactly():
    x, y = blobs(120, 3)
    fit = fit_logreg(x, y, 3, seed=0)
    head = create_head(x.shape[1], 3, dropout=0.5)
    init_from_logreg(head, fit)
    head.eval()
    scaler = StandardScaler().fit(x.numpy())
    expected = scaler.transform(x.numpy()) @ fit.weight.numpy().T + fit.bias.numpy()
    with torch.no_grad():
        assert np.allclose(head(x).numpy(), expected, atol=1e-4)
    # The same problem fitted by scikit-learn at the chosen C: the same predictions.
    model = LogisticRegression(C=fit.C, max_iter=500).fit(scaler.transform(x), y)
    assert (model.predict(scaler.transform(x)) == expected.argmax(1)).mean() > 0.98
    assert fit.converged and 0 < fit.cv_loss < 1 and fit.cv_acc > 0.9


def test_binary_and_absent_classes_map_onto_softmax_rows():
    x, y = blobs(80, 2)
    fit = fit_logreg(x, y, 3, seed=0)  # class 2 has no rows
    head = create_head(x.shape[1], 3, dropout=0.0)
    init_from_logreg(head, fit)
    with torch.no_grad():
        probs = head.eval()(x).softmax(1)
    assert probs[:, 2].max() < 1e-6  # never predicted
    assert (probs.argmax(1) == y).float().mean() > 0.9


def test_folds_are_stratified_unless_a_class_is_too_small():
    y = torch.tensor([0] * 9 + [1] * 9)
    folds = cv_folds(y, seed=0)
    assert len(folds) == 3 and all(
        np.bincount(y[test].numpy()).tolist() == [3, 3] for _, test in folds
    )
    rare = torch.tensor([0] * 10 + [1])  # one row of class 1: plain shuffled folds
    assert sorted(np.concatenate([test for _, test in cv_folds(rare, 0)]).tolist()) == list(
        range(11)
    )


def relabelled_source(x, y, classes):
    """A 'pretrained' classifier that knows each class (nearest class mean): near domain."""
    centers = torch.stack([x[y == k].mean(0) for k in range(classes)])
    return centers * 2, -(centers**2).sum(1)


def test_auto_keeps_the_source_start_where_it_explains_the_classes():
    x, y = blobs(90, 3)
    feats = split(x, y, 3, 60)
    result = train_head_on_features(
        feats, default_section(HeadParams), seed=0, source=relabelled_source(x, y, 3)
    )
    m = result.metrics
    assert m["source_start_cv_acc"] > 0.9 and m["domain"] == "near"
    assert m["init"] == ("source" if m["source_cv_loss"] < m["logreg_cv_loss"] else "logreg")
    assert "3-fold CV on train" in m["init_reason"]


def test_auto_fits_the_logistic_head_where_the_source_is_no_help():
    x, y = blobs(150, 5)
    feats = split(x, y, 5, 100)
    g = torch.Generator().manual_seed(1)
    useless = (torch.randn(40, x.shape[1], generator=g), torch.zeros(40))  # unrelated classes
    result = train_head_on_features(feats, default_section(HeadParams), seed=0, source=useless)
    m = result.metrics
    assert m["init"] == "logreg" and m["domain"] == "far"
    assert m["logreg_cv_loss"] < m["source_cv_loss"]
    assert m["valid_acc"] > 0.9 and m["epochs"] == 0
    assert result.history.columns.tolist()[:3] == ["epoch", "train_loss", "train_acc"]


def test_the_validation_labels_choose_nothing():
    """Shuffled validation labels: the same start, the same weights, bit for bit."""
    x, y = blobs(120, 4)
    g = torch.Generator().manual_seed(2)
    source = (torch.randn(10, x.shape[1], generator=g), torch.zeros(10))
    feats = split(x, y, 4, 80)
    shuffled = FeatureSet(
        feats.train_x, feats.train_y, feats.valid_x, feats.valid_y[torch.randperm(40, generator=g)],
        feats.classes, feats.fingerprint,
    )  # fmt: skip
    for params in (
        default_section(HeadParams),
        default_section(HeadParams, init="source"),
        default_section(HeadParams, init="random"),
    ):
        a = train_head_on_features(feats, params, seed=3, source=source)
        b = train_head_on_features(shuffled, params, seed=3, source=source)
        assert a.metrics["init"] == b.metrics["init"]
        sa, sb = a.head.state_dict(), b.head.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_training_keeps_a_logistic_heads_statistics():
    """The fitted standardisation stays put in train mode; a trained head's BN still tracks."""
    from torch import nn

    from visiontune.models.classifier import ImageClassifier
    from visiontune.train.epoch import set_train_mode

    for fixed in (True, False):
        body = nn.Sequential(nn.BatchNorm1d(4))
        model = ImageClassifier(nn.Identity(), body, create_head(4, 2), head_stats_fixed=fixed)
        set_train_mode(model, freeze_bn=True)
        assert not body[0].training and model.head[0].training is not fixed
        assert model.head[-1].training  # the Linear and dropout still train


def test_a_logistic_head_carries_no_dropout_into_the_fine_tune():
    """Its regularisation is the CV-chosen C; an SGD-trained head keeps `head.dropout`."""
    from records import fingerprint

    from visiontune.train.head_choice import head_record

    x, y = blobs(150, 5)
    feats = split(x, y, 5, 100)
    params = default_section(HeadParams)
    assert params.dropout > 0
    for init, dropout in (("logreg", 0.0), ("random", params.dropout)):
        result = train_head_on_features(feats, default_section(HeadParams, init=init), seed=0)
        assert [m.p for m in result.head if isinstance(m, torch.nn.Dropout)] == [dropout]
        feats = dataclasses.replace(feats, fingerprint=fingerprint())
        assert head_record(feats, params, result).head_dropout == dropout
