"""Backbones: any timm model with weights from PyPI, the hub, a local file, or none.

The backbone is built headless (`num_classes=0`: pooled penultimate features) and brings
its own data config (input size, normalisation, interpolation, crop) from timm.
"""

from __future__ import annotations

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


def create_backbone(name: str, weights: str) -> tuple[torch.nn.Module, WeightsInfo]:
    """A headless timm model (pooled features out) with the requested weights.

    Args:
        name: any timm model name (optionally with a pretrained tag, `resnet50.a1_in1k`).
        weights: "pypi" (offline EfficientNet-Lite0/1/2 checkpoints), "hub" (timm's
            pretrained download), "none" (random init) or a .pth/.pt/.safetensors path.
    """
    return create_timm_model(name, weights, num_classes=0)


def create_timm_model(
    name: str, weights: str, num_classes: int = 0
) -> tuple[torch.nn.Module, WeightsInfo]:
    """`create_backbone` with a choice of classifier size (0 = headless).

    With `num_classes` equal to the checkpoint's, its classifier is loaded too (the
    ImageNet head is how the tests prove a weight mapping right).
    """
    check_backbone_name(name)
    if weights == "hub":
        return _from_hub(name, num_classes)
    model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    classifier = model.pretrained_cfg.get("classifier", "")
    if weights == "none":
        return model, WeightsInfo(source="none", sha256=None)
    if weights == "pypi":
        path = pypi_checkpoint(name)
        what = f"PyPI checkpoint {path.name} for {name}"
        mapped = map_by_position(read_state_dict(path), _reference_state(name), what)
        load_matching(model, mapped, what, ignore_prefix=classifier)
    else:
        path = Path(weights).expanduser()
        what = f"weights file {path}"
        load_matching(model, read_state_dict(path), what, ignore_prefix=classifier)
    info = weights_identity(name, weights)
    assert info is not None  # only hub weights need the model to be identified
    return model, info


def source_classifier(
    name: str, weights: str, feature_dim: int
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The pretrained model's own classifier as (weight [classes, features], bias), or None.

    None when the weights carry no classifier (`none`, a headless file) or one that does not
    sit directly on the pooled features (`feature_dim` inputs), so it cannot seed a head.
    """
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
    elif weights == "pypi":
        path = pypi_checkpoint(name)
        what = f"PyPI checkpoint {path.name} for {name}"
        state = map_by_position(read_state_dict(path), _reference_state(name), what)
    else:
        state = read_state_dict(Path(weights).expanduser())
    weight, bias = state.get(f"{prefix}.weight"), state.get(f"{prefix}.bias")
    if weight is None or bias is None:
        return None
    weight = weight.detach().float().flatten(1)  # a 1x1 conv classifier is a Linear too
    if weight.shape[1] != feature_dim or bias.shape != (weight.shape[0],):
        return None
    return weight, bias.detach().float()


def _reference_state(name: str) -> dict[str, torch.Tensor]:
    """Names and shapes of the full pretrained model, classifier included, without memory."""
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False).state_dict()


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
    """The backbone's pretrained data config (timm), with `model.*` overrides applied."""
    cfg = pretrained_data_config(backbone)
    return DataConfig(
        image_size=params.image_size or cfg.image_size,
        mean=tuple(params.mean or cfg.mean),  # type: ignore[arg-type]
        std=tuple(params.std or cfg.std),  # type: ignore[arg-type]
        interpolation=params.interpolation or cfg.interpolation,
        crop_pct=params.crop_pct or cfg.crop_pct,
    )


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
