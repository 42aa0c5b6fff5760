"""Precompute: pooled backbone features of every train and valid image, fingerprinted.

Batched eval-mode inference at the eval transform (resize + centre crop, no augmentation),
decoded in loader workers; the result is a `FeatureSet` for the cache in
`visiontune.features`, with the backbone's own classifier to seed the head and the
features of a sample of mirrored train images (`flip: auto` tests them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from visiontune.config import BaseParams, ModelParams, PrecomputeParams, RuntimeParams
from visiontune.data.dataset import ImageDataset, create_loader
from visiontune.data.manifest import read_split
from visiontune.data.transforms import (
    DataConfig,
    PixelNormalize,
    create_eval_transform,
    eval_min_size,
)
from visiontune.distributed import (
    SINGLE,
    DistContext,
    gather_shards,
    rank_runtime,
    shard,
)
from visiontune.features import FeatureSet, compute_fingerprint, mirror_sample, model_overrides
from visiontune.inference import run_inference
from visiontune.models.backbone import create_backbone, resolve_data_config, source_classifier
from visiontune.runtime import (
    LoaderWait,
    Runtime,
    peak_gpu_mib,
    resolve_precision,
    resolve_runtime,
    seed_everything,
)


def expected_fingerprint(
    model: ModelParams, base: BaseParams, train_csv: Path, valid_csv: Path, classes: Sequence[str]
) -> dict[str, Any]:
    """The whole fingerprint a cache must have for these params (builds the backbone).

    `visiontune.features.expected_inputs` checks the same without timm, except for hub
    weights.
    """
    backbone, weights = create_backbone(model.backbone, model.weights)
    return compute_fingerprint(
        backbone=model.backbone,
        weights=weights,
        data_config=resolve_data_config(backbone, model),
        overrides=model_overrides(model),
        precision=resolve_precision(base),
        train_csv=train_csv,
        valid_csv=valid_csv,
        classes=classes,
    )


class EvalViews(ImageDataset):
    """The eval transform's crops; the items flagged in `mirrored` as their mirror images."""

    def __init__(
        self,
        paths: Sequence[str],
        labels: Sequence[int],
        mirrored: Sequence[bool],
        transform: Callable[[torch.Tensor], torch.Tensor],
        min_size: int,
    ) -> None:
        super().__init__(paths, labels, transform, min_size=min_size)
        self.mirrored = list(mirrored)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        pixels, label, index = super().__getitem__(key)
        return (pixels.flip(-1) if self.mirrored[index] else pixels), label, index


def pixel_encoder(backbone: torch.nn.Module, data_config: DataConfig) -> torch.nn.Sequential:
    """The backbone behind the input normalisation: uint8 pixel batches → pooled features."""
    return torch.nn.Sequential(PixelNormalize.from_config(data_config), backbone)


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
    *,
    mirror_seed: int,
    wait: LoaderWait,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """Features and labels of each split table, in table order, then of the mirror images
    of a seeded sample of the first table's rows (`mirror_sample`, with `mirror_seed`);
    and the sample's rows. `wait` gathers the time spent waiting for batches.

    All of them go through one DataLoader: its start (worker spawn, the first batches'
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
    mirror_rows = mirror_sample(len(frames[0]), mirror_seed)
    rows = mirror_rows.tolist()
    paths, labels = paths + [paths[r] for r in rows], labels + [labels[r] for r in rows]
    mirrored = [False] * (len(paths) - len(rows)) + [True] * len(rows)
    dataset = EvalViews(
        shard(paths, dist),
        shard(labels, dist),
        shard(mirrored, dist),
        create_eval_transform(data_config),
        min_size=eval_min_size(data_config),
    )
    encoder = pixel_encoder(backbone, data_config)
    if not dist.enabled:
        loader = create_loader(dataset, batch_size, runtime, shuffle=False, seed=seed)
        features, all_labels, _ = run_inference(
            encoder, loader, runtime, desc="features", wait=wait
        )
    else:
        # Each rank extracts every world_size-th image; rows are gathered back in order.
        if len(dataset) > 0:
            loader = create_loader(dataset, batch_size, runtime, shuffle=False, seed=seed)
            features, all_labels, _ = run_inference(
                encoder, loader, runtime, desc=f"features (rank {dist.rank})", wait=wait
            )
        else:  # more ranks than images
            features = torch.zeros(0, backbone.num_features)
            all_labels = torch.zeros(0, dtype=torch.int64)
        features = gather_shards(features, len(paths), dist)
        all_labels = gather_shards(all_labels, len(paths), dist)
    sizes = [len(frame) for frame in frames] + [len(rows)]
    # Clones: views of one storage cannot be saved as separate safetensors tensors.
    parts = [
        (x.clone(), y.clone())
        for x, y in zip(features.split(sizes), all_labels.split(sizes), strict=True)
    ]
    return parts, mirror_rows


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
    """Pooled eval-transform features of every train and valid image.

    `runtime_params` (loader workers) change how fast, never which features: each image
    is decoded alone, whichever worker decodes it.
    Under torchrun (`dist`) the ranks share the images and every rank gets all features.

    Returns:
        The features (fingerprinted) and the stage's own throughput: images, seconds and
        images/s of the whole pipeline (decoding included), and the feature dimension.
        Its ratio to the model alone is bench/'s to measure (bench/limits.py).
    """
    seed_everything(base.seed, base.deterministic)
    runtime = rank_runtime(
        resolve_runtime(base, runtime_params), dist, runtime_params.num_workers == "auto"
    )
    backbone, weights = create_backbone(model.backbone, model.weights)
    data_config = resolve_data_config(backbone, model)
    start, wait = time.perf_counter(), LoaderWait()
    parts, mirror_rows = _extract(
        backbone,
        [Path(train_csv), Path(valid_csv)],
        image_root,
        classes,
        data_config,
        runtime,
        params.batch_size,
        base.seed,
        dist,
        mirror_seed=base.seed,
        wait=wait,
    )
    (train_x, train_y), (valid_x, valid_y), (mirror_x, _) = parts
    seconds = time.perf_counter() - start
    count = len(train_y) + len(valid_y) + len(mirror_x)
    stats: dict[str, float | None] = {
        "images": count,
        "seconds": seconds,
        "images_per_s": count / seconds,
        "data_wait_share": wait.seconds / seconds,
        "peak_gpu_mib": peak_gpu_mib(runtime),
        "feature_dim": train_x.shape[1],
    }
    fingerprint = compute_fingerprint(
        backbone=model.backbone,
        weights=weights,
        data_config=data_config,
        overrides=model_overrides(model),
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
        fingerprint=fingerprint,
        # Read here, with timm at hand, so that train_head needs only the cache.
        source=source_classifier(model.backbone, model.weights, int(train_x.shape[1])),
        mirror_rows=mirror_rows,
        mirror_x=mirror_x,
    )
    return features, stats
