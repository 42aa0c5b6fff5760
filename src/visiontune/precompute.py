"""Precomputed backbone features (fastai's `precompute=True`), cached with a fingerprint.

The cache records everything that determines its values: backbone, weight file hash, data
config, precision and the split tables. `load_features` refuses a cache whose fingerprint
differs from the expected one, so a stale cache can never be used by mistake.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from visiontune.config import BaseParams, ModelParams, PrecomputeParams
from visiontune.data.dataset import ImageDataset, create_loader
from visiontune.data.manifest import read_split
from visiontune.data.transforms import DataConfig, create_eval_transform, eval_min_size
from visiontune.distributed import (
    SINGLE,
    DistContext,
    all_reduce_sum,
    gather_shards,
    rank_runtime,
    shard,
)
from visiontune.fileio import write_safetensors
from visiontune.inference import benchmark_forward, run_inference
from visiontune.models.backbone import WeightsInfo, create_backbone, resolve_data_config
from visiontune.runtime import Runtime, resolve_runtime, seed_everything

# Bump when the extraction itself changes (decoding, pooling, ...): old caches go stale.
FEATURES_VERSION = 1
_TENSORS = ("train_x", "train_y", "valid_x", "valid_y")


class StaleCacheError(RuntimeError):
    """A feature cache computed with other settings than the ones asked for."""

    def __init__(self, message: str, changed: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.changed = list(changed)


@dataclass(frozen=True)
class FeatureSet:
    """Pooled features and labels of the train and valid split, rows in split-CSV order."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    valid_x: torch.Tensor
    valid_y: torch.Tensor
    classes: list[str]
    fingerprint: dict[str, Any]


def manifest_hash(train_csv: Path, valid_csv: Path, classes: Sequence[str]) -> str:
    """SHA-256 of the split tables' bytes and the class list: which images, which labels."""
    digest = hashlib.sha256()
    for name, path in (("train", train_csv), ("valid", valid_csv)):
        digest.update(f"{name}\0".encode())
        digest.update(Path(path).read_bytes())
    digest.update(json.dumps(list(classes)).encode())
    return digest.hexdigest()


def compute_fingerprint(
    *,
    backbone: str,
    weights: WeightsInfo,
    data_config: DataConfig,
    precision: str,
    train_csv: Path,
    valid_csv: Path,
    classes: Sequence[str],
) -> dict[str, Any]:
    """Everything the feature values depend on, as a flat JSON-able dict."""
    return {
        "features_version": FEATURES_VERSION,
        "backbone": backbone,
        "weights_source": weights.source,
        "weights_sha256": weights.sha256,
        "data_config": data_config.to_dict(),
        "precision": precision,
        "manifest_sha256": manifest_hash(train_csv, valid_csv, classes),
    }


def expected_fingerprint(
    model: ModelParams, base: BaseParams, train_csv: Path, valid_csv: Path, classes: Sequence[str]
) -> dict[str, Any]:
    """The fingerprint a cache must have for these params (builds the backbone to hash it)."""
    backbone, weights = create_backbone(model.backbone, model.weights)
    return compute_fingerprint(
        backbone=model.backbone,
        weights=weights,
        data_config=resolve_data_config(backbone, model),
        precision=resolve_runtime(base).precision,
        train_csv=train_csv,
        valid_csv=valid_csv,
        classes=classes,
    )


def _json_safe(value: Any) -> Any:
    return json.loads(json.dumps(value))  # tuples → lists, as they come back from a file


def check_fingerprint(found: dict[str, Any], expected: dict[str, Any], where: str) -> None:
    """Raise StaleCacheError naming every key whose value differs."""
    expected = _json_safe(expected)
    changed = sorted(k for k in found.keys() | expected.keys() if found.get(k) != expected.get(k))
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
    tensors = {name: getattr(features, name).contiguous() for name in _TENSORS}
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
        tensors = {name: handle.get_tensor(name) for name in _TENSORS}
    return FeatureSet(**tensors, classes=json.loads(metadata["classes"]), fingerprint=fingerprint)


def _extract(
    backbone: torch.nn.Module,
    csv_paths: Sequence[Path],
    image_root: Path,
    classes: Sequence[str],
    data_config: DataConfig,
    runtime: Runtime,
    batch_size: int,
    seed: int,
    dist: DistContext = SINGLE,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], float]:
    """Features and labels of each split table, in table order, and the images/s.

    All tables go through one DataLoader: its start (worker spawn, the first batches'
    decoding while the model waits) is paid once, which on a 1000-image set was ~15 %.
    """
    frames = [read_split(Path(path), image_root) for path in csv_paths]
    index = {name: i for i, name in enumerate(classes)}
    for path, frame in zip(csv_paths, frames, strict=True):
        unknown = sorted(set(frame["label"].astype(str)) - index.keys())
        if unknown:
            raise ValueError(f"{path} has labels not in the class list: {', '.join(unknown[:10])}")
    paths = [p for frame in frames for p in frame["path"].tolist()]
    labels = [index[label] for frame in frames for label in frame["label"].astype(str)]
    dataset = ImageDataset(
        shard(paths, dist),
        shard(labels, dist),
        create_eval_transform(data_config),
        min_size=eval_min_size(data_config),
    )
    start = time.perf_counter()
    if not dist.enabled:
        loader = create_loader(dataset, batch_size, runtime, shuffle=False, seed=seed)
        features, all_labels, rate = run_inference(backbone, loader, runtime, desc="features")
    else:
        # Each rank extracts every world_size-th image; rows are gathered back in order.
        if len(dataset) > 0:
            loader = create_loader(dataset, batch_size, runtime, shuffle=False, seed=seed)
            features, all_labels, _ = run_inference(
                backbone, loader, runtime, desc=f"features (rank {dist.rank})"
            )
        else:  # more ranks than images
            features = torch.zeros(0, backbone.num_features)
            all_labels = torch.zeros(0, dtype=torch.int64)
        features = gather_shards(features, len(paths), dist)
        all_labels = gather_shards(all_labels, len(paths), dist)
        rate = len(paths) / (time.perf_counter() - start)
    sizes = [len(frame) for frame in frames]
    # Clones: views of one storage cannot be saved as separate safetensors tensors.
    parts = [
        (x.clone(), y.clone())
        for x, y in zip(features.split(sizes), all_labels.split(sizes), strict=True)
    ]
    return parts, rate


def precompute_features(
    model: ModelParams,
    base: BaseParams,
    params: PrecomputeParams,
    *,
    train_csv: Path,
    valid_csv: Path,
    classes: Sequence[str],
    image_root: Path,
    dist: DistContext = SINGLE,
) -> tuple[FeatureSet, dict[str, float]]:
    """Pooled eval-transform features of every train and valid image.

    Under torchrun (`dist`) the ranks share the images and every rank gets all features;
    the model-only benchmark runs on all ranks at once and reports their summed rate.

    Returns:
        The features (fingerprinted) and throughput stats: images/s of the whole
        pipeline and, when `params.benchmark_batches` > 0, of the model alone on random
        tensors (same batch size and precision), and their ratio.
    """
    seed_everything(base.seed, base.deterministic)
    runtime = rank_runtime(resolve_runtime(base), dist, base.num_workers == "auto")
    backbone, weights = create_backbone(model.backbone, model.weights)
    data_config = resolve_data_config(backbone, model)
    start = time.perf_counter()
    (train_x, train_y), (valid_x, valid_y) = _extract(
        backbone,
        [Path(train_csv), Path(valid_csv)],
        image_root,
        classes,
        data_config,
        runtime,
        params.batch_size,
        base.seed,
        dist,
    )[0]
    seconds = time.perf_counter() - start
    count = len(train_y) + len(valid_y)
    stats: dict[str, float] = {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "feature_dim": train_x.shape[1],
    }
    if params.benchmark_batches > 0:
        forward = benchmark_forward(
            backbone, runtime, params.batch_size, data_config.image_size, params.benchmark_batches
        )
        forward = all_reduce_sum(forward, dist)
        stats["forward_images_per_s"] = forward
        stats["pipeline_vs_forward"] = stats["images_per_s"] / forward
    fingerprint = compute_fingerprint(
        backbone=model.backbone,
        weights=weights,
        data_config=data_config,
        precision=runtime.precision,
        train_csv=train_csv,
        valid_csv=valid_csv,
        classes=classes,
    )
    features = FeatureSet(
        train_x=train_x,
        train_y=train_y,
        valid_x=valid_x,
        valid_y=valid_y,
        classes=list(classes),
        fingerprint=_json_safe(fingerprint),
    )
    return features, stats
