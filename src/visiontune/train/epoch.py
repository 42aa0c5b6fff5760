"""One fine-tune epoch's pieces: its batches (seeded by the epoch, sharded by rank: what a
single uninterrupted process sees), the train mode, the validation pass."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from visiontune.data.dataset import create_loader
from visiontune.distributed import SINGLE, DistContext, gather_shards
from visiontune.inference import run_inference
from visiontune.models.classifier import ImageClassifier
from visiontune.runtime import Runtime


def set_train_mode(model: ImageClassifier, freeze_bn: bool) -> None:
    """Train mode; with `freeze_bn` the body's BatchNorm layers keep their running stats, as
    a logistic head's always do (`head_stats_fixed`): they are the standardisation it was
    fitted for (tracking augmented batches cost digits 1.1 points in one epoch)."""
    model.train()
    frozen = [model.body] if freeze_bn else []
    if model.head_stats_fixed:
        frozen.append(model.head)
    for part in frozen:
        for module in part.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def evaluate(
    model: nn.Module,
    loader,
    runtime: Runtime,
    label_smoothing: float,
    dist: DistContext,
    total: int | None,
) -> tuple[float, float]:
    """(valid loss, valid accuracy) without TTA; under torchrun `loader` holds this rank's
    shard of the `total` images (`distributed.shard`), gathered so each counts once."""
    logits, labels, _ = run_inference(model, loader, runtime, desc="valid")
    if dist.enabled:  # `total` is checked by `finetune`
        logits, labels = gather_shards(logits, total, dist), gather_shards(labels, total, dist)
    loss = F.cross_entropy(logits, labels, label_smoothing=label_smoothing).item()
    return loss, (logits.argmax(1) == labels).float().mean().item()


def epoch_loader(
    dataset: torch.utils.data.Dataset,
    batch_size: int,
    runtime: Runtime,
    seed: int,
    epoch: int,
    dist: DistContext = SINGLE,
    skip_batches: int = 0,
) -> torch.utils.data.DataLoader:
    """This rank's batches of `epoch` (batch_size / world_size images): every world_size-th
    image of one seeded permutation, so global batch k is a single process's batch k, each
    image augmented from its own seed (seed + epoch, index). `skip_batches` go undecoded."""
    sampler = DistributedSampler(
        dataset, dist.world_size, dist.rank, shuffle=True, seed=seed, drop_last=True
    )
    sampler.set_epoch(epoch)
    per_rank = batch_size // dist.world_size
    return create_loader(
        dataset,
        per_rank,
        runtime,
        shuffle=False,
        seed=seed + epoch,
        drop_last=True,
        sampler=sampler,
        per_image_seeds=True,
        skip=skip_batches * per_rank,
    )
