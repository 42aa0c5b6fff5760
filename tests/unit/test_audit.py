"""The audit's pieces on features whose truth is known: planted flips, copies, an outlier."""

from __future__ import annotations

import numpy as np
import pytest

from visiontune.audit import AuditImages, audit_features, duplicate_pairs, robust_z
from visiontune.audit.labels import label_issues, out_of_sample_probs
from visiontune.audit.neighbours import nearest, unit_rows
from visiontune.audit.report import headline
from visiontune.config import AuditParams

PARAMS = AuditParams(duplicate_threshold=0.6, outlier_threshold=3.0, show=4)


def _clusters(n_per_class: int, classes: int, dim: int = 32, seed: int = 0):
    """Gaussian classes far enough apart for a linear fit to be right on ~all of them."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (classes, dim)) * 3
    y = np.repeat(np.arange(classes), n_per_class)
    x = centres[y] + rng.normal(0, 1, (len(y), dim))
    order = rng.permutation(len(y))
    return x[order].astype(np.float32), y[order]


def test_blockwise_search_finds_each_rows_true_nearest_neighbours():
    x, _ = _clusters(40, 3)
    rows = unit_rows(x, x.mean(axis=0))
    small_blocks = nearest(rows, k=5, block=7)
    full = (rows @ rows.T).fill_diagonal_(-2.0).topk(5, dim=1)
    assert np.array_equal(small_blocks.index, full.indices.numpy())
    assert np.allclose(small_blocks.similarity, full.values.numpy(), atol=1e-6)


def test_planted_copies_are_the_pairs_found_and_nothing_else():
    x, _ = _clusters(60, 3, dim=64)
    rng = np.random.default_rng(1)
    originals = [3, 50, 120]
    copies = x[originals] + rng.normal(0, 0.05, (3, x.shape[1])).astype(np.float32)
    everything = np.concatenate([x, copies])
    neighbours = nearest(unit_rows(everything, x.mean(axis=0)), 11)
    pairs = duplicate_pairs(neighbours, PARAMS.duplicate_threshold)
    assert {(i, j) for i, j, _ in pairs} == {(o, len(x) + n) for n, o in enumerate(originals)}
    assert all(score > 0.9 for *_, score in pairs)


def test_flipped_labels_are_flagged_with_their_true_class():
    x, y = _clusters(100, 3, dim=16)
    flipped = np.random.default_rng(5).choice(len(y), 24, replace=False)  # 8 %
    noisy = y.copy()
    noisy[flipped] = (y[flipped] + 1) % 3
    probs = out_of_sample_probs(x, noisy, x[:10], 3, seed=0)
    issues = label_issues(noisy, probs.train, "prune_by_noise_rate")
    found = set(issues.rows.tolist()) & set(flipped.tolist())
    # cleanlab is conservative: it may pass over a flip, it must not flag clean labels.
    assert len(found) >= 0.8 * len(flipped)
    assert set(issues.rows.tolist()) <= set(flipped.tolist())
    suggested = dict(zip(issues.rows.tolist(), issues.suggested.tolist(), strict=True))
    assert suggested == {i: int(y[i]) for i in found}
    assert np.all(np.diff(issues.quality) >= 0)  # most suspect first
    assert 0.8 * len(flipped) <= issues.estimated <= 1.2 * len(flipped)


def test_a_row_is_scored_by_a_fold_that_never_saw_its_label():
    x, y = _clusters(50, 2, dim=8)
    base = out_of_sample_probs(x, y, x[:5], 2, seed=0)
    flipped = y.copy()
    flipped[0] = 1 - y[0]
    changed = out_of_sample_probs(x, flipped, x[:5], 2, seed=0)
    # Its fold's model never saw row 0's label: flipping it barely moves the row's
    # probabilities (C, chosen on all rows, may move), and the wrong label stays unlikely.
    assert np.allclose(base.train[0], changed.train[0], atol=0.05)
    assert changed.train[0, flipped[0]] < 0.1


def test_robust_z_is_not_moved_by_the_outlier_itself():
    values = np.array([1.0, 1.1, 0.9, 1.05, 0.95, 100.0])
    z = robust_z(values)
    assert z[-1] > 100
    assert np.all(np.abs(z[:-1]) < 2)


def test_audit_reports_each_kind_with_ids_and_counts_leaks():
    x, y = _clusters(40, 2, dim=32, seed=3)
    rng = np.random.default_rng(4)
    x = np.concatenate([x, x[:1] + rng.normal(0, 0.02, (1, 32)).astype(np.float32)])
    y = np.concatenate([y, y[:1]])
    x[7] = 40.0  # far from everything
    y_noisy = y.copy()
    y_noisy[11] = 1 - y[11]
    n_train = 60  # the copy of row 0 (a train row) is the last valid row: a leak
    images = AuditImages(
        paths=[f"img{i}.jpg" for i in range(len(y))],
        labels=y_noisy,
        splits=["train"] * n_train + ["valid"] * (len(y) - n_train),
        ids=[f"{i:064x}" for i in range(len(y))],
        n_train=n_train,
    )
    audit = audit_features(x[:n_train], x[n_train:], images, ["a", "b"], PARAMS, seed=0)
    found = audit.findings
    labels = found[found["kind"] == "label"]
    assert "img11.jpg" in set(labels["path"])
    row = labels[labels["path"] == "img11.jpg"].iloc[0]
    assert (row["given_label"], row["suggested_label"]) == (
        ["a", "b"][y_noisy[11]],
        ["a", "b"][y[11]],
    )
    pairs = found[found["kind"] == "duplicate"]
    assert list(zip(pairs["path"], pairs["other_path"], strict=True)) == [("img0.jpg", "img80.jpg")]
    assert (pairs.iloc[0]["split"], pairs.iloc[0]["other_split"]) == ("train", "valid")
    assert pairs.iloc[0]["other_id"] == f"{80:064x}"
    assert found[found["kind"] == "outlier"]["path"].iloc[0] == "img7.jpg"
    assert audit.metrics["duplicate_pairs_across_splits"] == 1
    assert audit.metrics["label_issues"] == len(labels)
    assert audit.metrics["images"] == len(y)


@pytest.mark.parametrize("k", [1, 3])
def test_tiny_sets_do_not_break_the_search(k):
    rows = unit_rows(np.eye(3, dtype=np.float32), np.zeros(3, np.float32))
    neighbours = nearest(rows, k)
    assert neighbours.index.shape == (3, min(k, 2))


def test_too_few_train_images_give_no_label_findings_and_say_why():
    x = np.random.default_rng(0).normal(size=(4, 8)).astype(np.float32)
    images = AuditImages(
        paths=["a.jpg", "b.jpg", "c.jpg", "d.jpg"],
        labels=np.array([0, 1, 0, 1]),
        splits=["train", "train", "valid", "valid"],
        ids=["0" * 64] * 4,
        n_train=2,
    )
    audit = audit_features(x[:2], x[2:], images, ["a", "b"], PARAMS, seed=0)
    assert audit.metrics["label_issues"] == 0 and audit.metrics["probe_cv_accuracy"] is None
    assert (audit.findings["kind"] != "label").all()
    assert "too few train images to audit labels" in headline(audit.metrics)
