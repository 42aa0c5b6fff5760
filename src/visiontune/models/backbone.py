"""Backbones: any timm model, headless (pooled features out), with weights from PyPI, the
hub, a local file or none, and its timm data config (size, normalisation, resampling, crop)."""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
from collections.abc import Mapping
from pathlib import Path

import timm
import torch
from timm.data import resolve_data_config as timm_data_config
from timm.models import get_pretrained_cfg

from visiontune.config import ModelParams
from visiontune.data.transforms import DataConfig
from visiontune.models.weights import (
    PYPI_CHECKPOINTS,
    WeightsError,
    WeightsInfo,
    load_matching,
    map_by_position,
    pypi_checkpoint,
    read_state_dict,
    weights_identity,
)


def check_backbone_name(name: str) -> None:
    """Fail early, with close matches, on a name timm does not know."""
    if timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    raise ValueError(f"unknown timm backbone {name!r}{hint}")


def create_backbone(
    name: str, weights: str, num_classes: int = 0
) -> tuple[torch.nn.Module, WeightsInfo]:
    """The timm model `name` (a pretrained tag allowed: `resnet50.a1_in1k`) with `weights`
    "pypi" (offline EfficientNet-Lite0/1/2 checkpoints), "hub" (timm's download), "none"
    (random init) or a .pth/.pt/.safetensors path. Headless (pooled features out) unless
    `num_classes`: that classifier is loaded too when its size is the checkpoint's (the
    ImageNet head is how the tests prove a mapping right)."""
    check_backbone_name(name)
    if weights == "hub":
        return _from_hub(name, num_classes)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if weights != "none":
        state, what = _read_weights(name, weights)
        load_matching(model, state, what, ignore_prefix=model.pretrained_cfg.get("classifier", ""))
    info = weights_identity(name, weights)
    assert info is not None  # only hub weights need the model to be identified
    return model, info


def source_classifier(
    name: str, weights: str, feature_dim: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The pretrained model's own classifier as (weight [classes, features], bias), or None
    where the weights carry none that sits directly on the `feature_dim` pooled features."""
    if weights == "none":
        return None
    with torch.device("meta"):  # only the config is needed: no memory, no init
        prefix = timm.create_model(name, pretrained=False).pretrained_cfg.get("classifier", "")
    if not prefix:
        return None
    if weights == "hub":
        cfg = get_pretrained_cfg(name)
        model, _ = _from_hub(name, num_classes=(cfg.num_classes if cfg else None) or 1000)
        state = {f"{prefix}.{k}": v for k, v in model.get_classifier().state_dict().items()}
    else:
        state, _ = _read_weights(name, weights)
    weight, bias = state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias")
    if weight is None or bias is None:
        return None
    weight = weight.detach().float().flatten(1)  # a 1x1 conv classifier is a Linear too
    if weight.shape[1] != feature_dim or bias.shape != (weight.shape[0],):
        return None
    return weight, bias.detach().float()


def _read_weights(name: str, weights: str) -> tuple[dict[str, torch.Tensor], str]:
    """The PyPI checkpoint or weights file in timm's tensor names, and its name for errors."""
    if weights != "pypi":
        path = Path(weights).expanduser()
        return read_state_dict(path), f"weights file {path}"
    path = pypi_checkpoint(name)
    what = f"PyPI checkpoint {path.name} for {name}"
    with torch.device("meta"):  # the full model's names and shapes, without memory
        reference = timm.create_model(name, pretrained=False).state_dict()
    return map_by_position(read_state_dict(path), reference, what), what


def _from_hub(name: str, num_classes: int) -> tuple[torch.nn.Module, WeightsInfo]:
    offline = (
        "offline alternatives: weights: pypi (for "
        f"{', '.join(PYPI_CHECKPOINTS)}), or weights: path/to/file.pth|.safetensors"
    )
    cfg = get_pretrained_cfg(name)
    source = cfg and (cfg.hf_hub_id or cfg.url or cfg.file)
    if not source:
        raise WeightsError(f"timm has no pretrained weights for {name!r}; {offline}")
    try:
        model = timm.create_model(name, pretrained=True, num_classes=num_classes)
    except Exception as exc:  # network, cache and HTTP errors come in many types
        raise WeightsError(
            f"could not get pretrained weights for {name!r} from the hub "
            f"({type(exc).__name__}: {exc}); if you are offline, use the {offline}"
        ) from exc
    # The hub caches files under names we do not control: hash the loaded tensors instead.
    return model, WeightsInfo(source=f"hub:{source}", sha256=sha256_state(model.state_dict()))


def sha256_state(state: Mapping[str, torch.Tensor]) -> str:
    """Content hash of a state dict (names, dtypes, shapes and values, in key order)."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def resolve_data_config(backbone: torch.nn.Module, params: ModelParams) -> DataConfig:
    """The backbone's pretrained data config (timm), with the `model.*` overrides set."""
    names = {field.name for field in dataclasses.fields(DataConfig)}
    overrides = params.model_dump(include=names, exclude_none=True)
    return dataclasses.replace(pretrained_data_config(backbone), **overrides)


def pretrained_data_config(backbone: torch.nn.Module) -> DataConfig:
    """The backbone's own pretrained data config (timm's), no overrides."""
    cfg = timm_data_config({}, model=backbone)
    return DataConfig(
        image_size=int(cfg["input_size"][-1]),
        mean=tuple(cfg["mean"]),  # type: ignore[arg-type]
        std=tuple(cfg["std"]),  # type: ignore[arg-type]
        interpolation=str(cfg["interpolation"]),
        crop_pct=float(cfg["crop_pct"]),
    )
