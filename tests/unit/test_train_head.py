"""Head training on feature tensors: learns, records history, saves and reloads exactly."""

from __future__ import annotations

import pytest
import records
import torch
from real_config import default_section
from safetensors.torch import save_file

from visiontune.config import HeadParams
from visiontune.features import FeatureSet
from visiontune.models.head import category_relationship, create_head, init_from_source
from visiontune.train.head import load_head, save_head
from visiontune.train.head_choice import (
    head_record,
    resolve_head_init,
    train_head_on_features,
)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is faster, and far faster when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def features(n: int = 200, dim: int = 24, classes: int = 3) -> FeatureSet:
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(classes, dim, generator=g) * 2
    y = torch.randint(0, classes, (n,), generator=g)
    x = centers[y] + torch.randn(n, dim, generator=g)
    fingerprint = {**records.fingerprint(), "backbone": "resnet18", "weights_sha256": "ab" * 32}
    names = [f"c{i}" for i in range(classes)]
    return FeatureSet(x[:150], y[:150], x[150:], y[150:], names, fingerprint)


def test_head_learns_and_round_trips(tmp_path):
    feats = features()
    params = default_section(
        HeadParams, init="random", epochs=6, batch_size=32, hidden=(16,), dropout=0.1, lr=3.0e-3
    )
    result = train_head_on_features(feats, params, seed=0)
    assert result.metrics["valid_acc"] > 0.9
    assert result.history["epoch"].tolist() == list(range(6))
    lrs = result.history["lr"].tolist()  # cosine over the whole run: decreasing
    assert lrs[0] == pytest.approx(params.lr) and lrs == sorted(lrs, reverse=True)
    path = tmp_path / "head.safetensors"
    save_head(path, result.head, head_record(feats, params, result))
    head, info = load_head(path)
    assert info.classes == ["c0", "c1", "c2"] and info.head_hidden == (16,)
    assert info.weights_sha256 == "ab" * 32 and info.head_init == "random"
    assert info.head_in_features == 24 and info.mirror is None and info.inference is None
    with torch.no_grad():
        assert torch.equal(head(feats.valid_x), result.head(feats.valid_x))


def test_same_seed_same_head():
    feats = features()
    params = default_section(HeadParams, init="random", epochs=2, batch_size=32)
    a = train_head_on_features(feats, params, seed=5).head.state_dict()
    b = train_head_on_features(feats, params, seed=5).head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_that_is_not_a_head_is_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    rerun = "holds no visiontune model record; re-run `dvc repro train_head`"
    with pytest.raises(ValueError, match=rerun):
        load_head(path)


def source_task(n: int = 300, dim: int = 16, seed: int = 0):
    """Features of 6 'pretrained' classes whose own classifier knows them, re-labelled
    into 3 target classes of 2 source classes each (like ImageNet's breeds → dog)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(6, dim, generator=g) * 3
    source_y = torch.randint(0, 6, (n,), generator=g)
    x = centers[source_y] + torch.randn(n, dim, generator=g) + 5  # off-centre, like pooled features
    weight = centers.clone()  # nearest-centre logits: a classifier that knows the 6 classes
    bias = -0.5 * (centers**2).sum(1) - weight @ torch.full((dim,), 5.0)
    target_y = source_y // 2
    return x, target_y, (weight, bias), source_y


def test_relationship_rows_are_distributions_and_find_the_source_classes():
    x, y, (weight, bias), _ = source_task()
    relation = category_relationship(x, y, 4, weight, bias)  # class 3 has no train rows
    assert relation.shape == (4, 6)
    assert torch.allclose(relation.sum(1), torch.ones(4))
    # Each target class puts its mass on its own two source classes.
    for k in range(3):
        assert relation[k, 2 * k : 2 * k + 2].sum() > 0.95
    overall = torch.softmax(x @ weight.T + bias, 1).mean(0)
    assert torch.allclose(relation[3], overall)


def test_source_init_is_the_relabelled_source_classifier_exactly():
    x, y, (weight, bias), _ = source_task()
    head = create_head(x.shape[1], 3, dropout=0.5)
    relation = init_from_source(head, x, y, weight, bias)
    head.eval()
    with torch.no_grad():
        expected = (x @ weight.T + bias) @ relation.T  # Σ_j p(j|k) · source logit j
        assert torch.allclose(head(x), expected, rtol=1e-4, atol=1e-3)


def test_source_init_starts_where_the_pretrained_classifier_is():
    x, y, source, _ = source_task()
    feats = FeatureSet(x[:60], y[:60], x[60:], y[60:], ["a", "b", "c"], {"backbone": "toy"})
    seeded = train_head_on_features(
        feats,
        default_section(HeadParams, init="source", epochs=1, batch_size=16),
        seed=0,
        source=source,
    ).metrics
    scratch = train_head_on_features(
        feats,
        default_section(HeadParams, init="random", epochs=1, batch_size=16),
        seed=0,
        source=source,
    ).metrics
    assert seeded["init"] == "source" and scratch["init"] == "random"
    assert seeded["init_valid_acc"] > 0.95 and seeded["valid_acc"] > 0.95
    assert scratch["init_valid_acc"] < 0.7 and scratch["valid_acc"] < seeded["valid_acc"]


def test_head_init_follows_the_params():
    source = (torch.zeros(6, 16), torch.zeros(6))
    assert resolve_head_init(default_section(HeadParams, init="auto"), source, "b") == "auto"
    assert resolve_head_init(default_section(HeadParams, init="auto"), None, "b") == "logreg"
    assert resolve_head_init(default_section(HeadParams, init="logreg"), source, "b") == "logreg"
    assert resolve_head_init(default_section(HeadParams, init="random"), source, "b") == "random"
    assert (
        resolve_head_init(default_section(HeadParams, init="auto", hidden=(8,)), source, "b")
        == "random"
    )
    with pytest.raises(ValueError, match=r"weights of resnet18 carry no classifier.*allowed: auto"):
        resolve_head_init(default_section(HeadParams, init="source"), None, "resnet18")
