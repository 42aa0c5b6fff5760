"""Evaluation metrics on known predictions, checked against scikit-learn and by hand."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import accuracy_score, classification_report, log_loss

from visiontune.evaluate import metrics

CLASSES = ["bird", "cat", "dog"]


@pytest.fixture
def known() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 60)
    logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return probs, labels


def test_summary_matches_sklearn(known):
    probs, labels = known
    scores = metrics.summary(probs, labels)
    assert scores["accuracy"] == pytest.approx(accuracy_score(labels, probs.argmax(1)))
    assert scores["loss"] == pytest.approx(log_loss(labels, probs, labels=[0, 1, 2]))


def test_per_class_matches_classification_report(known):
    probs, labels = known
    table = metrics.per_class_table(probs, labels, CLASSES)
    report = classification_report(
        labels, probs.argmax(1), target_names=CLASSES, output_dict=True, zero_division=0
    )
    for row in table.itertuples(index=False):
        expected = report[row[0]]
        assert row.precision == pytest.approx(expected["precision"])
        assert row.recall == pytest.approx(expected["recall"])
        assert row.f1 == pytest.approx(expected["f1-score"])
        assert row.support == expected["support"]
    macro = metrics.macro_scores(table)
    assert macro["f1_macro"] == pytest.approx(report["macro avg"]["f1-score"])


def test_absent_class_scores_zero_and_is_left_out_of_macro():
    probs = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0], [0.6, 0.4, 0.0]])
    labels = np.array([0, 1, 1])  # "dog" never occurs and is never predicted
    table = metrics.per_class_table(probs, labels, CLASSES)
    assert table.loc[2, ["precision", "recall", "f1", "support"]].tolist() == [0, 0, 0, 0]
    assert table.loc[1, "recall"] == pytest.approx(0.5)
    assert metrics.macro_scores(table)["recall_macro"] == pytest.approx(0.75)


def test_predictions_table_and_loss_by_hand():
    probs = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    table = metrics.predictions_table(["a.jpg", "b.jpg"], probs, np.array([0, 1]), CLASSES)
    assert table["label"].tolist() == ["bird", "cat"]
    assert table["predicted"].tolist() == ["bird", "dog"]
    np.testing.assert_allclose(table["prob"], [0.7, 0.6], rtol=1e-6)
    np.testing.assert_allclose(table["loss"], [-np.log(0.7), -np.log(0.3)], rtol=1e-6)


def test_zero_probability_gives_a_finite_loss():
    loss = metrics.per_image_loss(np.array([[1.0, 0.0]], dtype=np.float32), np.array([1]))
    assert np.isfinite(loss).all() and loss[0] > 80


def test_most_confused_orders_pairs_by_count():
    counts = np.array([[5, 3, 0], [1, 6, 4], [0, 3, 2]])
    table = metrics.most_confused(counts, CLASSES, limit=3)
    assert table[["actual", "predicted", "count"]].values.tolist() == [
        ["cat", "dog", 4],
        ["bird", "cat", 3],
        ["dog", "cat", 3],
    ]
    assert table["share"].tolist() == pytest.approx([4 / 11, 3 / 8, 3 / 5])
    assert metrics.most_confused(np.diag([3, 4, 5]), CLASSES, limit=5).empty


def test_paired_change_counts_the_images_that_changed_and_tests_the_split():
    # before right on images 0-11; after right on 4-19: 8 gained (12-19), 4 lost (0-3).
    before, after = np.arange(20) < 12, np.arange(20) >= 4
    change = metrics.paired_change(before, after)
    assert (change["gained"], change["lost"]) == (8, 4)
    # Exact two-sided McNemar: P(|X - 6| >= 2), X ~ Binomial(12, 1/2) = 1588 / 4096.
    assert change["p"] == pytest.approx(1588 / 4096)
    # One-sided, fewer gained than lost: P(X <= 8) = 3797 / 4096; the reverse split 794 / 4096.
    assert metrics.paired_change(before, after, "less")["p"] == pytest.approx(3797 / 4096)
    assert metrics.paired_change(after, before, "less")["p"] == pytest.approx(794 / 4096)
    assert metrics.paired_change(before, before) == {"gained": 0, "lost": 0, "p": 1.0}
    lopsided = metrics.paired_change(np.zeros(10, bool), np.ones(10, bool))
    assert lopsided["p"] == pytest.approx(2 / 2**10)
