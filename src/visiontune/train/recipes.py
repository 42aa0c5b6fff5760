"""The recipe's steps on real images: backbone + trained head, datasets, and the LR finder run.

What the lr_find and finetune stages share: the same classifier, the same augmented
training set, the same layer groups and optimizer.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from visiontune.config import FinetuneParams, LrFindParams, ModelParams, Params
from visiontune.data.dataset import ImageDataset, create_loader
from visiontune.data.transforms import (
    DataConfig,
    PixelNormalize,
    create_eval_transform,
    create_train_transform,
    eval_min_size,
    train_min_size,
)
from visiontune.fileio import save_config, sha256_file, write_csv, write_json
from visiontune.models.backbone import WeightsInfo, create_backbone
from visiontune.models.classifier import ImageClassifier, ModelInfo, save_model_file
from visiontune.runtime import Runtime, prepare_module
from visiontune.train.epoch import set_train_mode
from visiontune.train.groups import create_layer_groups, create_param_groups
from visiontune.train.head import create_optimizer, load_head
from visiontune.train.loop import FinetuneResult
from visiontune.train.lr_find import LrFindResult, find_lr
from visiontune.train.schedules import group_lrs
from visiontune.train.step import train_step

# The course's layer-group ratios for lr_ratios: auto. Where the backbone's own classifier
# already explains your classes (a "near" domain), the early layers need
# little change: lr/100, lr/10, lr. Data far from ImageNet (the course's satellite images)
# needs its early layers to move: lr/9, lr/3, lr. Other group counts space the ratios
# geometrically between the same ends.
NEAR_EARLIEST_RATIO = 0.01
FAR_EARLIEST_RATIO = 1 / 9


def resolve_finetune(finetune: FinetuneParams, head: ModelInfo) -> FinetuneParams:
    """`finetune` with its `auto` values made concrete from what train_head found.

    `lr_ratios: auto` follows the head's domain: "near" when the backbone's own classifier,
    re-labelled, nearly matches a logistic fit in CV. `augment.flip: auto` mirrors only
    where a mirror image keeps its class (`visiontune.train.mirror`). Both were decided
    on the train features alone.
    """
    update: dict[str, Any] = {}
    if finetune.lr_ratios == "auto":
        earliest = NEAR_EARLIEST_RATIO if head.domain == "near" else FAR_EARLIEST_RATIO
        last = finetune.layer_groups - 1
        update["lr_ratios"] = tuple(
            earliest ** ((last - g) / last) for g in range(finetune.layer_groups)
        )
    if finetune.augment.flip == "auto":
        flip = head.mirror_symmetric
        update["augment"] = finetune.augment.model_copy(update={"flip": flip})
    return finetune.model_copy(update=update)


class StaleHeadError(ValueError):
    """The trained head was fitted on features of another backbone or other weights."""


def load_classifier(
    model_params: ModelParams, head_path: Path
) -> tuple[ImageClassifier, ModelInfo, WeightsInfo]:
    """The pretrained backbone with the head trained on its cached features, and the
    model's record as train_head wrote it (its data config is the feature cache's)."""
    head, info = load_head(head_path)
    body, weights = create_backbone(model_params.backbone, model_params.weights)
    if info.backbone != model_params.backbone or info.weights_sha256 != weights.sha256:
        raise StaleHeadError(
            f"{head_path} was trained on features of {info.backbone} "
            f"(weights {str(info.weights_sha256)[:12]}), not {model_params.backbone} "
            f"(weights {str(weights.sha256)[:12]}): rerun precompute and train_head"
        )
    normalize = PixelNormalize.from_config(info.data_config)
    # A logistic head's BatchNorm holds the fit's standardisation: training keeps it.
    fixed = info.head_init == "logreg"
    return ImageClassifier(normalize, body, head, head_stats_fixed=fixed), info, weights


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> list[int]:
    """Class index of every label; a label outside `classes` is an error naming it."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels) - set(index))
    if unknown:
        raise ValueError(f"labels not among the model's classes: {unknown[:5]}")
    return [index[label] for label in labels]


def create_train_dataset(
    frame: pd.DataFrame, classes: Sequence[str], data_config: DataConfig, augment
) -> ImageDataset:
    """Augmented training images (`frame`: absolute `path`, `label`)."""
    return ImageDataset(
        frame["path"].tolist(),
        label_indices(frame["label"].tolist(), classes),
        create_train_transform(data_config, augment),
        min_size=train_min_size(data_config, augment),
    )


def create_valid_loader(
    frame: pd.DataFrame,
    classes: Sequence[str],
    data_config: DataConfig,
    batch_size: int,
    runtime: Runtime,
    seed: int,
):
    """Validation images at the eval transform, in table order."""
    dataset = ImageDataset(
        frame["path"].tolist(),
        label_indices(frame["label"].tolist(), classes),
        create_eval_transform(data_config),
        min_size=eval_min_size(data_config),
    )
    return create_loader(dataset, batch_size, runtime, shuffle=False, seed=seed)


def run_lr_find(
    model: ImageClassifier,
    train_dataset: ImageDataset,
    finetune: FinetuneParams,
    params: LrFindParams,
    runtime: Runtime,
    seed: int,
) -> LrFindResult:
    """The LR range test on the whole network as finetune will train it.

    Same layer groups, ratios, optimizer, BatchNorm mode and augmentation as finetune;
    the model and optimizer come back exactly as they were.
    """
    prepare_module(model, runtime)
    groups = create_layer_groups(model, finetune.layer_groups)
    param_groups = create_param_groups(
        model, groups, group_lrs(params.start_lr, finetune.lr_ratios), finetune.weight_decay
    )
    optimizer = create_optimizer(
        param_groups, finetune.optimizer, params.start_lr, finetune.weight_decay, finetune.momentum
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    batch_size = min(params.batch_size, len(train_dataset))
    loader = create_loader(
        train_dataset,
        batch_size,
        runtime,
        shuffle=True,
        seed=seed,
        drop_last=True,
        per_image_seeds=True,
    )

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            for inputs, targets, _ in loader:
                yield inputs, targets

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return train_step(
            model, optimizer, inputs, targets,
            label_smoothing=finetune.label_smoothing, runtime=runtime, scaler=scaler,
        )[0]  # fmt: skip

    set_train_mode(model, finetune.freeze_bn)
    try:
        return find_lr(
            model,
            optimizer,
            batches(),
            step,
            finetune.lr_ratios,
            start_lr=params.start_lr,
            end_lr=params.end_lr,
            num_iter=params.num_iter,
            smooth=params.smooth,
            diverge=params.diverge,
        )
    finally:
        model.eval()


def resume_config(
    params: Params,
    finetune: FinetuneParams,
    lr: float,
    runtime: Runtime,
    weights: WeightsInfo,
    head_path: Path,
    train_csv: Path,
) -> dict[str, Any]:
    """Everything that shapes a fine-tune: a checkpoint is resumed only when it is the same.

    What cannot change results (worker counts, tracking, timing) is left out, so changing
    it keeps a checkpoint resumable.
    """
    return {
        "base": params.base.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "finetune": finetune.model_dump(mode="json"),
        "lr": lr,
        "precision": runtime.precision,
        "device": runtime.device.type,
        "weights_sha256": weights.sha256,
        "head_sha256": sha256_file(head_path),
        "train_sha256": sha256_file(train_csv),
    }


def save_finetune(
    out: Path, result: FinetuneResult, info: ModelInfo, lr: float, config: dict[str, Any]
) -> dict[str, Any]:
    """Write finetune's outputs (model file, per-step and per-epoch tables, metrics, layer
    groups, config) into `out`; its metrics."""
    save_model_file(out / "model.safetensors", result.model, info)
    write_csv(out / "steps.csv", result.steps)
    write_csv(out / "history.csv", result.history)
    metrics = {**result.metrics, "lr": lr, "resumed_from_step": result.resumed_from}
    write_json(out / "metrics.json", metrics)
    write_json(out / "layer_groups.json", result.layer_groups)
    save_config(out / "config.json", config)
    return metrics
