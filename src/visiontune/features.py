"""The feature cache (fastai's `precompute=True`): features, labels and a fingerprint of
everything they depend on. `load_features` refuses a cache whose fingerprint differs, key by
key. No timm nor torchvision: the stages that only read the cache start a second sooner."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as package_version
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import safe_open

from visiontune.config import BaseParams, ModelParams
from visiontune.data.manifest import read_classes
from visiontune.fileio import write_safetensors
from visiontune.models.weights import WeightsInfo, weights_identity
from visiontune.runtime import resolve_precision

if TYPE_CHECKING:
    from visiontune.data.transforms import DataConfig

# Bump when the extraction or the cache's content changes: old caches go stale.
# 2: the source classifier is cached; timm version and model overrides fingerprinted.
# 3: the eval resize runs on uint8 tensors (torch's antialiased kernel: 3.5x faster, ~0.02
#    grey levels from Pillow's); the torch version is fingerprinted (that kernel, bf16).
# 4: the features of a sample of mirrored train images (`flip: auto`).
FEATURES_VERSION = 4
_TENSORS = ("train_x", "train_y", "valid_x", "valid_y")
_MIRROR_TENSORS = ("mirror_rows", "mirror_x")
_SOURCE_TENSORS = ("source_weight", "source_bias")

# Train images whose mirror images precompute also caches, at most: ~1,000 more forward
# passes, and on digits ~100 images that the mirror changes, enough for p ~ 1e-8.
MIRROR_SAMPLE = 1000


def mirror_sample(n_train: int, seed: int) -> torch.Tensor:
    """The train rows (sorted) whose mirror images precompute caches: a seeded sample."""
    if n_train <= MIRROR_SAMPLE:
        return torch.arange(n_train)
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_train, generator=generator)[:MIRROR_SAMPLE].sort().values


class StaleCacheError(ValueError):
    """A feature cache computed with other settings than the ones asked for."""

    def __init__(self, message: str, changed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.changed = list(changed)


@dataclass(frozen=True)
class FeatureSet:
    """Pooled features and labels of the train and valid split, rows in split-CSV order;
    `mirror_x` of the mirror images of the train rows `mirror_rows`; `source`: the backbone's
    own classifier (weight [classes, features], bias), if any sits on these features."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    classes: list[str]
    fingerprint: dict[str, Any]
    source: tuple[torch.Tensor, torch.Tensor] | None = None
    mirror_rows: torch.Tensor | None = None
    mirror_x: torch.Tensor | None = None


def manifest_hash(train_csv: Path, valid_csv: Path, classes: Sequence[str]) -> str:
    """SHA-256 of the split tables' bytes and the class list: which images, which labels."""
    digest = hashlib.sha256()
    for name, path in (("train", train_csv), ("valid", valid_csv)):
        digest.update(f"{name}\0".encode())
        digest.update(Path(path).read_bytes())
    digest.update(json.dumps(list(classes)).encode())
    return digest.hexdigest()


def model_overrides(model: ModelParams) -> dict[str, Any]:
    """The `model.*` values that override the backbone's pretrained data config."""
    fields = {"image_size", "mean", "std", "interpolation", "crop_pct"}
    return _json_safe(model.model_dump(include=fields))


def compute_fingerprint(
    model: ModelParams,
    base: BaseParams,
    weights: WeightsInfo,
    data_config: DataConfig | None,
    train_csv: Path,
    valid_csv: Path,
    classes: Sequence[str],
) -> dict[str, Any]:
    """Everything the feature values depend on (params, weights, split), as a flat JSON-able
    dict; without the data config where it is None (see `check_fingerprint`)."""
    try:
        torchcodec: str | None = package_version("torchcodec")
    except PackageNotFoundError:
        torchcodec = None
    fingerprint = {
        "features_version": FEATURES_VERSION,
        "backbone": model.backbone,
        "weights_source": weights.source,
        "weights_sha256": weights.sha256,
        "timm_version": package_version("timm"),
        "torch_version": torch.__version__,
        # The JPEG decoders (visiontune.data.pixels); no TorchCodec: Pillow decodes them all.
        "pillow_version": package_version("pillow"),
        "torchcodec_version": torchcodec,
        "model_overrides": model_overrides(model),
        "precision": resolve_precision(base),
        "manifest_sha256": manifest_hash(train_csv, valid_csv, classes),
    }
    if data_config is not None:
        fingerprint["data_config"] = data_config.to_dict()
    return _json_safe(fingerprint)


def expected_inputs(
    model: ModelParams, base: BaseParams, train_csv: Path, valid_csv: Path, classes: Sequence[str]
) -> dict[str, Any] | None:
    """The fingerprint a cache must have for these params, without the backbone's data config
    (see `check_fingerprint`). None for hub weights, identified only once loaded: use
    `visiontune.precompute.expected_fingerprint` then."""
    weights = weights_identity(model.backbone, model.weights)
    if weights is None:
        return None
    return compute_fingerprint(model, base, weights, None, train_csv, valid_csv, classes)


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples → lists, as they come back from a file


def check_fingerprint(found: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise StaleCacheError naming every key whose value differs. The data config follows
    from the backbone, timm version and `model.*` overrides: a check that cannot build the
    model (no timm) leaves it out of `expected`, and those keys are compared instead."""
    expected = _json_safe(expected)
    keys = found.keys() | expected.keys()
    if "data_config" not in expected:
        keys -= {"data_config"}
    changed = sorted(k for k in keys if found.get(k) != expected.get(k))
    if changed:
        details = "; ".join(
            f"{k}: cached {found.get(k)!r}, expected {expected.get(k)!r}" for k in changed
        )
        raise StaleCacheError(
            f"{where} is stale ({', '.join(changed)} changed): {details}. "
            "Re-run the precompute stage (dvc repro precompute).",
            changed,
        )


def save_features(path: Path, features: FeatureSet) -> None:
    """Write tensors + classes + fingerprint to one safetensors file (atomic)."""
    tensors = {name: getattr(features, name) for name in (*_TENSORS, *_MIRROR_TENSORS)}
    if features.source is not None:
        tensors |= dict(zip(_SOURCE_TENSORS, (t.float() for t in features.source), strict=True))
    tensors = {name: t.contiguous() for name, t in tensors.items() if t is not None}
    metadata = {
        "classes": json.dumps(features.classes),
        "fingerprint": json.dumps(features.fingerprint, sort_keys=True),
    }
    write_safetensors(path, tensors, metadata)  # canonical header: same bytes every run


def load_features(path: Path, expected_fingerprint: dict[str, Any]) -> FeatureSet:
    """Read a feature cache; StaleCacheError if it was computed with other settings."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"feature cache not found: {path}; run the precompute stage first")
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        metadata = handle.metadata() or {}
        if "fingerprint" not in metadata or "classes" not in metadata:
            raise StaleCacheError(f"{path} has no fingerprint: not a visiontune feature cache")
        fingerprint = json.loads(metadata["fingerprint"])
        check_fingerprint(fingerprint, expected_fingerprint, str(path))
        names = set(handle.keys()) & {*_TENSORS, *_MIRROR_TENSORS, *_SOURCE_TENSORS}
        tensors = {name: handle.get_tensor(name) for name in names}
    source = None
    if "source_weight" in tensors:
        source = (tensors.pop("source_weight"), tensors.pop("source_bias"))
    classes = json.loads(metadata["classes"])
    return FeatureSet(**tensors, classes=classes, fingerprint=fingerprint, source=source)


def load_current_features(
    folder: Path, split: Path, model: ModelParams, base: BaseParams
) -> FeatureSet:
    """The feature cache in `folder`, refused (StaleCacheError) unless these params and the
    `split` folder's tables and classes produced it: its fingerprint is recomputed, not read."""
    classes = read_classes(split / "classes.json")
    where = (model, base, split / "train.csv", split / "valid.csv")
    expected = expected_inputs(*where, classes)
    if expected is None:  # hub weights: identified by loading them (timm, imported only then)
        from visiontune.precompute import expected_fingerprint

        expected = expected_fingerprint(*where, classes)
    return load_features(folder / "features.safetensors", expected)
