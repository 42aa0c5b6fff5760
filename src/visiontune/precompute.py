"""Precompute: the backbone's pooled features of every train and valid image at the eval
transform, and of a sample of mirrored train images (`flip: auto` tests them), fingerprinted,
with the backbone's own classifier to seed the head (`visiontune.features.FeatureSet`)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, Subset
from torchvision.transforms import v2

from visiontune.config import BaseParams, ModelParams, PrecomputeParams, RuntimeParams
from visiontune.data.dataset import ImageDataset, create_loader
from visiontune.data.manifest import label_indices, read_split
from visiontune.data.transforms import DataConfig, PixelNormalize, create_eval_transform
from visiontune.distributed import SINGLE, DistContext, gather_shards, rank_runtime, shard
from visiontune.features import FeatureSet, compute_fingerprint, mirror_sample
from visiontune.inference import run_inference
from visiontune.models.backbone import create_backbone, resolve_data_config, source_classifier
from visiontune.runtime import LoaderWait, peak_gpu_mib, resolve_runtime, seed_everything


def expected_fingerprint(
    model: ModelParams, base: BaseParams, train_csv: Path, valid_csv: Path, classes: Sequence[str]
) -> dict[str, Any]:
    """The whole fingerprint a cache must have for these params, building the backbone
    (`visiontune.features.expected_inputs` checks the same without timm but for hub weights)."""
    backbone, weights = create_backbone(model.backbone, model.weights)
    data_config = resolve_data_config(backbone, model)
    return compute_fingerprint(model, base, weights, data_config, train_csv, valid_csv, classes)


def pixel_encoder(backbone: torch.nn.Module, data_config: DataConfig) -> torch.nn.Sequential:
    """The backbone behind the input normalisation: uint8 pixel batches → pooled features."""
    return torch.nn.Sequential(PixelNormalize.from_config(data_config), backbone)


def _eval_views(
    tables: Sequence[Path],
    image_root: Path,
    classes: Sequence[str],
    data_config: DataConfig,
    seed: int,
    dist: DistContext,
) -> tuple[Subset, list[int], torch.Tensor]:
    """This rank's share of the split `tables`' rows, in order, then of the mirror images of
    a seeded sample of the first table's rows; the parts' sizes and the sample's rows."""
    frames = [read_split(Path(path), image_root) for path in tables]
    paths = [p for frame in frames for p in frame["path"].tolist()]
    labels = [
        label
        for path, frame in zip(tables, frames, strict=True)
        for label in label_indices(frame["label"], classes, str(path)).tolist()
    ]
    mirror_rows = mirror_sample(len(frames[0]), seed)
    rows = mirror_rows.tolist()
    crop, min_size = create_eval_transform(data_config), data_config.resize_size
    mirror = v2.Compose([crop, v2.functional.horizontal_flip])
    views = ConcatDataset(
        [
            ImageDataset(paths, labels, crop, min_size=min_size),
            ImageDataset([paths[r] for r in rows], [labels[r] for r in rows], mirror, min_size),
        ]
    )
    local = Subset(views, shard(range(len(views)), dist))
    return local, [len(frame) for frame in frames] + [len(rows)], mirror_rows


def precompute_features(
    model: ModelParams,
    base: BaseParams,
    params: PrecomputeParams,
    *,
    runtime_params: RuntimeParams,
    train_csv: Path,
    valid_csv: Path,
    classes: Sequence[str],
    image_root: Path,
    dist: DistContext = SINGLE,
) -> tuple[FeatureSet, dict[str, float | None]]:
    """The feature cache's content and the stage's throughput (decoding included); under
    torchrun (`dist`) the ranks share the images and every rank gets all features.
    `runtime_params` change how fast, never which features: each image is decoded alone."""
    seed_everything(base.seed, base.deterministic)
    runtime = rank_runtime(
        resolve_runtime(base, runtime_params), dist, runtime_params.num_workers == "auto"
    )
    backbone, weights = create_backbone(model.backbone, model.weights)
    data_config = resolve_data_config(backbone, model)
    start, wait = time.perf_counter(), LoaderWait()
    tables = (train_csv, valid_csv)
    dataset, sizes, mirror_rows = _eval_views(
        tables, image_root, classes, data_config, base.seed, dist
    )
    count = sum(sizes)
    # One DataLoader for all: its start (worker spawn, the first batches' decoding while the
    # model waits) is paid once, ~15 % of a 1000-image set. Under torchrun each rank
    # extracts every world_size-th image, gathered back in order.
    if len(dataset) or not dist.enabled:
        loader = create_loader(dataset, params.batch_size, runtime, shuffle=False, seed=base.seed)
        encoder = pixel_encoder(backbone, data_config)
        desc = f"features (rank {dist.rank})" if dist.enabled else "features"
        x, y, _ = run_inference(encoder, loader, runtime, desc=desc, wait=wait)
    else:  # more ranks than images
        x, y = torch.zeros(0, backbone.num_features), torch.zeros(0, dtype=torch.int64)
    x, y = gather_shards(x, count, dist), gather_shards(y, count, dist)
    # Clones: views of one storage cannot be saved as separate safetensors tensors.
    train_x, valid_x, mirror_x = (part.clone() for part in x.split(sizes))
    train_y, valid_y, _ = (part.clone() for part in y.split(sizes))
    seconds = time.perf_counter() - start
    stats: dict[str, float | None] = {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "data_wait_share": wait.seconds / seconds,
        "peak_gpu_mib": peak_gpu_mib(runtime),
        "feature_dim": train_x.shape[1],
    }
    features = FeatureSet(
        train_x=train_x,
        train_y=train_y,
        valid_x=valid_x,
        valid_y=valid_y,
        classes=list(classes),
        fingerprint=compute_fingerprint(model, base, weights, data_config, *tables, classes),
        # Read here, with timm at hand, so that train_head needs only the cache.
        source=source_classifier(model.backbone, model.weights, int(train_x.shape[1])),
        mirror_rows=mirror_rows,
        mirror_x=mirror_x,
    )
    return features, stats
