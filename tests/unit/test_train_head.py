"""Head training on feature tensors: learns, records history, saves and reloads exactly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from visiontune.config import HeadParams
from visiontune.features import FeatureSet
from visiontune.train.head import head_metadata, load_head, save_head, train_head_on_features


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
    fingerprint = {"backbone": "resnet18", "weights_sha256": "ab" * 32}
    names = [f"c{i}" for i in range(classes)]
    return FeatureSet(x[:150], y[:150], x[150:], y[150:], names, fingerprint)


def test_head_learns_and_round_trips(tmp_path):
    feats = features()
    params = HeadParams(epochs=6, batch_size=32, hidden=(16,), dropout=0.1)
    result = train_head_on_features(feats, params, seed=0)
    assert result.metrics["valid_acc"] > 0.9
    assert result.history["epoch"].tolist() == list(range(6))
    lrs = result.history["lr"].tolist()  # cosine over the whole run: decreasing
    assert lrs[0] == pytest.approx(params.lr) and lrs == sorted(lrs, reverse=True)
    path = tmp_path / "head.safetensors"
    save_head(path, result.head, head_metadata(feats, params))
    head, meta = load_head(path)
    assert meta["classes"] == ["c0", "c1", "c2"] and meta["hidden"] == [16]
    assert meta["weights_sha256"] == "ab" * 32
    with torch.no_grad():
        assert torch.equal(head(feats.valid_x), result.head(feats.valid_x))


def test_same_seed_same_head():
    feats = features()
    params = HeadParams(epochs=2, batch_size=32)
    a = train_head_on_features(feats, params, seed=5).head.state_dict()
    b = train_head_on_features(feats, params, seed=5).head.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_that_is_not_a_head_is_rejected(tmp_path):
    path = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not a visiontune head"):
        load_head(path)
