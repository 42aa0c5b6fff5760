"""Two runs with the same params, data and seed on CPU: identical split files and feature
caches, metrics equal to within 1e-6 (timings aside)."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from project_copy import SMALL_OVERRIDES, deep_merge, stage_argv
from safetensors import safe_open

REPO = Path(__file__).resolve().parents[2]

# Real photos, tiny: 4 per class and split, 64 px, a 1-epoch fine-tune at a fixed LR.
OVERRIDES = {
    "runtime": {"num_workers": 0},
    "data": {"max_per_class": 4},
    "model": {"image_size": 64},
    "precompute": {"batch_size": 8},
    "head": {"epochs": 3, "batch_size": 4},
    "finetune": {"n_cycles": 1, "cycle_len": 1, "batch_size": 4, "lr": 1.0e-3},
    "tracking": {"enabled": False},
}
TIMINGS = ("seconds", "per_s", "throughput", "wait_share")


def stage(name: str):
    spec = importlib.util.spec_from_file_location(f"stage_{name}", REPO / "stages" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def run_pipeline(root: Path, dogscats: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fetch → split → precompute → train_head → finetune, in-process, at their dvc.yaml paths."""
    root.mkdir()
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params = deep_merge(deep_merge(params, SMALL_OVERRIDES), OVERRIDES)
    params["data"]["source"] = str(dogscats)
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(root)
    for name in ("fetch", "split", "precompute", "train_head", "finetune"):
        assert stage(name)(stage_argv(name)) == 0, name


@pytest.fixture(scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def two_runs(dogscats, tmp_path_factory, one_thread) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("determinism")
    with pytest.MonkeyPatch.context() as monkeypatch:
        run_pipeline(base / "a", dogscats, monkeypatch)
        run_pipeline(base / "b", dogscats, monkeypatch)
    return base / "a", base / "b"


def _numbers(data, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_numbers(value, f"{name}."))
        elif isinstance(value, int | float) and not isinstance(value, bool):
            flat[name] = float(value)
    return {k: v for k, v in flat.items() if not any(word in k for word in TIMINGS)}


def test_split_files_and_feature_cache_are_byte_identical(two_runs) -> None:
    a, b = two_runs
    for rel in (
        "data/prepared/manifest.csv",
        "data/prepared/rejects.csv",
        "data/split/classes.json",
        "data/split/train.csv",
        "data/split/valid.csv",
        "data/split/report.json",
        "outputs/features/fingerprint.json",
        "outputs/features/features.safetensors",
        "outputs/head/head.safetensors",
    ):
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    with safe_open(a / "outputs/features/features.safetensors", "pt") as handle:
        assert handle.get_tensor(handle.keys()[0]).abs().sum() > 0  # real features


def test_metrics_are_equal_to_within_1e_6(two_runs) -> None:
    a, b = two_runs
    compared = 0
    for rel in ("outputs/head/metrics.json", "outputs/finetune/metrics.json"):
        first = _numbers(json.loads((a / rel).read_text()))
        second = _numbers(json.loads((b / rel).read_text()))
        assert first.keys() == second.keys() and first, rel
        for key, value in first.items():
            assert math.isclose(value, second[key], rel_tol=0, abs_tol=1e-6), (rel, key)
            compared += 1
    assert compared >= 6
    for rel in ("outputs/head/history.csv", "outputs/finetune/steps.csv"):
        assert (a / rel).read_text() == (b / rel).read_text(), rel


def test_the_feature_cache_bytes_do_not_depend_on_hash_order(tmp_path: Path) -> None:
    """safetensors writes metadata from a Rust HashMap (random order per call): the cache
    (two metadata keys) gave different bytes for the same features half of the time."""
    from visiontune.features import FeatureSet, save_features

    features = FeatureSet(
        train_x=torch.randn(4, 8), train_y=torch.tensor([0, 1, 0, 1]),
        valid_x=torch.randn(2, 8), valid_y=torch.tensor([1, 0]),
        classes=["cats", "dogs"], fingerprint={"backbone": "b", "precision": "fp32"},
    )  # fmt: skip
    digests = set()
    for i in range(12):
        save_features(tmp_path / f"{i}.safetensors", features)
        digests.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(digests) == 1
