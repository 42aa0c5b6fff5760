"""What the lr_find and finetune stages share on real images: the classifier (backbone +
trained head), the datasets, the trainer; and lr_find's run and finetune's outputs."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from visiontune.config import FinetuneParams, LrFindParams, ModelParams, Params
from visiontune.data.dataset import ImageDataset, create_loader
from visiontune.data.manifest import label_indices
from visiontune.data.transforms import (
    DataConfig,
    PixelNormalize,
    create_eval_transform,
    create_train_transform,
    train_min_size,
)
from visiontune.fileio import sha256_file, write_csv, write_json
from visiontune.models.backbone import WeightsInfo, create_backbone
from visiontune.models.classifier import ImageClassifier, ModelInfo, save_model_file
from visiontune.runtime import Runtime
from visiontune.train.epoch import set_train_mode
from visiontune.train.head import load_head
from visiontune.train.loop import FinetuneResult
from visiontune.train.lr_find import LrFindResult, find_lr
from visiontune.train.trainer import Trainer

# The course's layer-group ratios for lr_ratios: auto. Near ImageNet the early layers need
# little change (lr/100, lr/10, lr); far from it (satellite images) they must move (lr/9,
# lr/3, lr). Other group counts space the ratios geometrically between the same ends.
NEAR_EARLIEST_RATIO = 0.01
FAR_EARLIEST_RATIO = 1 / 9


def resolve_finetune(finetune: FinetuneParams, head: ModelInfo) -> FinetuneParams:
    """`finetune` with its `auto` values made concrete from what train_head found on the
    train features: `lr_ratios` follow the head's domain, `augment.flip` mirrors only where
    a mirror image keeps its class (`visiontune.train.mirror`)."""
    update: dict[str, Any] = {}
    if finetune.lr_ratios == "auto":
        earliest = NEAR_EARLIEST_RATIO if head.domain == "near" else FAR_EARLIEST_RATIO
        last = finetune.layer_groups - 1
        update["lr_ratios"] = tuple(
            earliest ** ((last - g) / last) for g in range(finetune.layer_groups)
        )
    if finetune.augment.flip == "auto":
        update["augment"] = finetune.augment.model_copy(update={"flip": head.mirror_symmetric})
    return finetune.model_copy(update=update)


def load_classifier(
    model_params: ModelParams, head_path: Path
) -> tuple[ImageClassifier, ModelInfo, WeightsInfo]:
    """The pretrained backbone with the head trained on its cached features, and the
    model's record as train_head wrote it (its data config is the feature cache's)."""
    head, info = load_head(head_path)
    body, weights = create_backbone(model_params.backbone, model_params.weights)
    if info.backbone != model_params.backbone or info.weights_sha256 != weights.sha256:
        raise ValueError(
            f"{head_path} was trained on features of {info.backbone} "
            f"(weights {str(info.weights_sha256)[:12]}), not {model_params.backbone} "
            f"(weights {str(weights.sha256)[:12]}): rerun precompute and train_head"
        )
    normalize = PixelNormalize.from_config(info.data_config)
    model = ImageClassifier(normalize, body, head, head_stats_fixed=info.head_init == "logreg")
    return model, info, weights


def _dataset(
    frame: pd.DataFrame, classes: Sequence[str], transform: Callable, min_size: int, where: str
) -> ImageDataset:
    """`frame`'s images (absolute `path`, `label`); a label outside `classes` is an error."""
    targets = label_indices(frame["label"], classes, where).tolist()
    return ImageDataset(frame["path"].tolist(), targets, transform, min_size=min_size)


def create_train_dataset(
    frame: pd.DataFrame, classes: Sequence[str], data_config: DataConfig, augment
) -> ImageDataset:
    """Augmented training images."""
    transform = create_train_transform(data_config, augment)
    min_size = train_min_size(data_config, augment)
    return _dataset(frame, classes, transform, min_size, "the training table")


def create_valid_loader(
    frame: pd.DataFrame,
    classes: Sequence[str],
    data_config: DataConfig,
    batch_size: int,
    runtime: Runtime,
    seed: int,
):
    """Validation images at the eval transform, in table order."""
    transform = create_eval_transform(data_config)
    dataset = _dataset(frame, classes, transform, data_config.resize_size, "the validation table")
    return create_loader(dataset, batch_size, runtime, shuffle=False, seed=seed)


def run_lr_find(
    model: ImageClassifier,
    train_dataset: ImageDataset,
    finetune: FinetuneParams,
    params: LrFindParams,
    runtime: Runtime,
    seed: int,
) -> LrFindResult:
    """The LR range test on the whole network as finetune will train it (the same trainer,
    BatchNorm mode and augmentation); the model and optimizer come back as they were."""
    run = Trainer(model, len(train_dataset), finetune, runtime, lr=params.start_lr)
    loader = create_loader(
        train_dataset,
        min(params.batch_size, len(train_dataset)),
        runtime,
        shuffle=True,
        seed=seed,
        drop_last=True,
        per_image_seeds=True,
    )
    # Epoch after epoch, without the dataset indices.
    batches = ((x, y) for _ in itertools.count() for x, y, _index in loader)
    sweep = params.model_dump(include={"start_lr", "end_lr", "num_iter", "smooth", "diverge"})
    set_train_mode(model, finetune.freeze_bn)
    try:
        return find_lr(model, run.optimizer, batches, run.step, finetune.lr_ratios, **sweep)
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
    What cannot change results (workers, tracking, timing) is left out."""
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
    """Write finetune's outputs into `out`; its metrics."""
    save_model_file(out / "model.safetensors", result.model, info)
    write_csv(out / "steps.csv", result.steps)
    write_csv(out / "history.csv", result.history)
    metrics = {**result.metrics, "lr": lr, "resumed_from_step": result.resumed_from}
    write_json(out / "metrics.json", metrics)
    write_json(out / "layer_groups.json", result.layer_groups)
    write_json(out / "config.json", config)
    return metrics
