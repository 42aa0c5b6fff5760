"""The head's layer layout and the self-contained model file."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from records import model_info
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from visiontune.data.transforms import DataConfig, PixelNormalize
from visiontune.models.classifier import (
    ModelInfo,
    RecordError,
    build_classifier,
    load_model_file,
    save_model_file,
)
from visiontune.models.head import create_head
from visiontune.models.record import read_model_info

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
    info = model_info(classes=["a", "b", "c"], data_config=DATA, head_hidden=(8,),
                      head_dropout=0.2)  # fmt: skip
    model = build_classifier(info)
    model.train()
    with torch.no_grad():  # move BN running statistics away from their init values
        model(torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8))
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
    assert meta["schema_version"] == 2 and meta["data_config"]["image_size"] == 64


def test_model_file_rejects_mismatched_classes(trained_like, tmp_path: Path) -> None:
    model, info = trained_like
    wrong = dataclasses.replace(info, classes=["a", "b"])
    with pytest.raises(ValueError, match="3 outputs but info lists 2 classes"):
        save_model_file(tmp_path / "m.safetensors", model, wrong)


def test_foreign_older_or_future_files_are_refused_with_what_to_rerun(trained_like, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(foreign))
    with pytest.raises(RecordError, match="holds no visiontune model record; re-run `dvc repro`"):
        load_model_file(foreign)
    _, info = trained_like
    for version, label in ((99, "future"), (1, "older")):
        data = {**json.loads(info.to_json()), "schema_version": version}
        path = tmp_path / f"{label}.safetensors"
        save_file({"w": torch.zeros(2)}, str(path), metadata={"visiontune": json.dumps(data)})
        with pytest.raises(RecordError, match=f"record version {version}.*re-run `dvc repro`"):
            read_model_info(path)
    with pytest.raises(FileNotFoundError):
        load_model_file(tmp_path / "missing.safetensors")


@pytest.mark.parametrize("field", ["domain", "mirror_symmetric", "inference", "weights_sha256"])
def test_a_missing_or_renamed_field_fails_loudly(trained_like, tmp_path, field: str) -> None:
    """No field stands in with a default: a renamed key fails naming both names."""
    _, info = trained_like
    data = json.loads(info.to_json())
    data[f"{field}_renamed"] = data.pop(field)
    path = tmp_path / "renamed.safetensors"
    save_file({"w": torch.zeros(2)}, str(path), metadata={"visiontune": json.dumps(data)})
    with pytest.raises(RecordError, match=rf"missing \['{field}'\], unknown \['{field}_renamed'\]"):
        read_model_info(path)


def test_a_malformed_verdict_is_refused(trained_like) -> None:
    _, info = trained_like
    data = json.loads(info.to_json())
    data["mirror_symmetric"] = "yes"
    with pytest.raises(RecordError, match="malformed model record"):
        ModelInfo.from_json(json.dumps(data), "m", "rerun")
    data = {**json.loads(info.to_json()), "domain": "nearby"}
    with pytest.raises(RecordError, match="domain must be one of"):
        ModelInfo.from_json(json.dumps(data), "m", "rerun")
