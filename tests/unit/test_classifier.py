"""The head's layer layout and the self-contained model file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from visiontune.data.transforms import DataConfig, PixelNormalize
from visiontune.models.classifier import (
    ModelInfo,
    create_classifier,
    load_model_file,
    read_model_info,
    save_model_file,
)
from visiontune.models.head import create_head

DATA = DataConfig(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "bicubic", 0.875)


def test_head_is_bn_dropout_linear() -> None:
    head = create_head(16, 3, (), 0.4)
    assert [type(m) for m in head] == [nn.BatchNorm1d, nn.Dropout, nn.Linear]
    assert head[1].p == 0.4 and head[2].in_features == 16 and head[2].out_features == 3


def test_head_hidden_layers_are_linear_relu_bn_dropout() -> None:
    head = create_head(16, 5, (8, 4), 0.1)
    kinds = [type(m) for m in head]
    block = [nn.Linear, nn.ReLU, nn.BatchNorm1d, nn.Dropout]
    assert kinds == [nn.BatchNorm1d, nn.Dropout, *block, *block, nn.Linear]
    assert head(torch.randn(6, 16)).shape == (6, 5)
    with pytest.raises(ValueError, match="num_classes"):
        create_head(16, 0, (), 0.1)


@pytest.fixture(scope="module")
def trained_like() -> tuple[nn.Module, ModelInfo]:
    model, _ = create_classifier(
        "tf_efficientnet_lite0", "none", 3, hidden=(8,), dropout=0.2, data_config=DATA
    )
    model.train()
    with torch.no_grad():  # move BN running statistics away from their init values
        model(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
    info = ModelInfo("tf_efficientnet_lite0", ["a", "b", "c"], DATA, (8,), 0.2)
    return model.eval(), info


def test_model_file_round_trip_gives_identical_logits(trained_like, tmp_path: Path) -> None:
    model, info = trained_like
    path = tmp_path / "model.safetensors"
    save_model_file(path, model, info)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]  # no temp files left
    loaded, loaded_info = load_model_file(path)
    assert loaded_info == info and not loaded.training
    pixels = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with torch.no_grad():
        assert torch.equal(loaded(pixels), model(pixels))
    # The input normalisation is rebuilt from the data config; the file holds no copy of it.
    assert not any(key.startswith("normalize") for key in model.state_dict())
    expected = PixelNormalize.from_config(DATA)(pixels)
    assert torch.equal(loaded.normalize(pixels), expected)
    with safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["visiontune"])
    assert meta["format_version"] == 1 and meta["data_config"]["image_size"] == 64


def test_the_classifier_normalises_with_the_backbones_pretrained_config_by_default() -> None:
    model, _ = create_classifier("tf_efficientnet_lite0", "none", 2, hidden=(), dropout=0.0)
    white = torch.full((1, 3, 8, 8), 255, dtype=torch.uint8)
    # EfficientNet-Lite's mean = std = 0.5: white is 1.0 after normalisation
    assert torch.equal(model.normalize(white), torch.ones(1, 3, 8, 8))


def test_model_file_rejects_mismatched_classes(trained_like, tmp_path: Path) -> None:
    model, info = trained_like
    wrong = ModelInfo(info.backbone, ["a", "b"], DATA, (8,), 0.2)
    with pytest.raises(ValueError, match="3 outputs but info lists 2 classes"):
        save_model_file(tmp_path / "m.safetensors", model, wrong)


def test_foreign_or_future_files_are_refused(trained_like, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a visiontune model file"):
        load_model_file(foreign)
    future = tmp_path / "future.safetensors"
    _, info = trained_like
    meta = {"visiontune": json.dumps({**info.to_dict(), "format_version": 99})}
    save_file({"w": torch.zeros(2)}, str(future), metadata=meta)
    with pytest.raises(ValueError, match="format 99"):
        read_model_info(future)
    with pytest.raises(FileNotFoundError):
        load_model_file(tmp_path / "missing.safetensors")
