"""The fine-tune loop: unfrozen body, differential LRs, SGDR/one-cycle per step, resumable.

One optimizer group per layer group; the LR of every group is set from the pure schedule
at every step. The loop keeps the loss on the device (no host sync per step), checkpoints
at every epoch end and when asked to stop, and resumes to the same final weights. It
reports its own throughput (images/s per epoch); bench/ compares it with the limits.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn

from visiontune.config import FinetuneParams
from visiontune.distributed import (
    SINGLE,
    DistContext,
    all_reduce_mean,
    any_rank,
    barrier,
    check_in_sync,
)
from visiontune.runtime import LoaderWait, Runtime, peak_gpu_mib
from visiontune.train.checkpoint import CHECKPOINT_NAME, restore_rng
from visiontune.train.epoch import epoch_loader, evaluate, set_train_mode
from visiontune.train.groups import layer_groups_report
from visiontune.train.schedules import set_lrs
from visiontune.train.trainer import Progress, Trainer, create_trainer


class TrainingInterrupted(RuntimeError):
    """Training stopped on request (SIGTERM) after writing a checkpoint to resume from."""


@dataclass(frozen=True)
class FinetuneResult:
    """The fine-tuned model (eval mode) and what the stage writes about it."""

    model: nn.Module
    history: pd.DataFrame
    steps: pd.DataFrame
    metrics: dict[str, Any]
    layer_groups: dict[str, Any]
    resumed_from: int | None


def finetune(
    model: nn.Module,
    train_dataset: torch.utils.data.Dataset,
    valid_loader,
    params: FinetuneParams,
    runtime: Runtime,
    *,
    lr: float,
    seed: int,
    checkpoint_dir: Path,
    config: dict[str, Any],
    stop: threading.Event | None = None,
    on_step: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict[str, float]], None] | None = None,
    log: Callable[[str], None] = print,
    dist: DistContext = SINGLE,
    sync_bn: bool = False,
    valid_total: int | None = None,
) -> FinetuneResult:
    """Fine-tune `model` (`.body` + `.head`) on `train_dataset`; resume from checkpoint_dir.

    A checkpoint whose `config` differs from `config` is ignored (and the reason logged).
    Raises TrainingInterrupted after checkpointing when `stop` gets set. `on_step` gets the
    number of steps done after each step; `on_epoch` (rank 0 only) a copy of each epoch's
    history row, the row of history.csv, before that epoch's checkpoint (so whatever it
    draws from the RNGs, a resumed run draws alike). Their exceptions stop the run.

    Under torchrun (`dist`) the model is wrapped in DistributedDataParallel and
    `params.batch_size` is the global batch: each rank takes batch_size / world_size images
    of it (a DistributedSampler over the same per-epoch permutation a single process
    walks), so one step sees the same images, averages the same gradient and applies the
    same LR whatever the world size. `valid_loader` holds this rank's shard of the
    `valid_total` validation images. Only rank 0 writes checkpoints.
    """
    stop = stop or threading.Event()
    run = create_trainer(
        model, len(train_dataset), params, runtime, lr=lr, dist=dist, sync_bn=sync_bn,
        valid_total=valid_total,
    )  # fmt: skip
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    state, rng = run.resume(path, config, log)
    resumed_from = None if rng is None else state.step
    while state.step < run.schedule.total_steps:
        if rng is not None:
            restore_rng(rng)  # the RNGs as they were at the interruption
            rng = None
        epoch = state.step // run.schedule.steps_per_epoch
        timed = _train_epoch(run, state, train_dataset, seed, stop, on_step)
        if timed is None:
            run.save(path, state, config)
            barrier(dist)  # the checkpoint is on disk before any rank exits
            raise TrainingInterrupted(f"stopped at step {state.step}; checkpoint {path}")
        row = _end_epoch(run, state, epoch, *timed, valid_loader, valid_total)
        log(
            f"finetune: epoch {epoch + 1}/{run.schedule.epochs} train_loss "
            f"{row['train_loss']:.4f} valid_loss {row['valid_loss']:.4f} "
            f"valid_acc {row['valid_acc']:.4f} ({row['images_per_s']:.1f} img/s)"
        )
        if on_epoch is not None and dist.is_main:
            on_epoch(dict(row))
        run.save(path, state, config)
    check_in_sync(model, dist)
    return _result(run, state, resumed_from)


def _train_epoch(
    run: Trainer,
    state: Progress,
    dataset: torch.utils.data.Dataset,
    seed: int,
    stop: threading.Event,
    on_step: Callable[[int], None] | None,
) -> tuple[float, int, float] | None:
    """Train the rest of the current epoch, one scheduled step per batch.

    Returns its training seconds, images (all ranks) and seconds spent waiting for
    batches, or None when `stop` was set on any rank before its end. Either way the
    losses so far are in `state`.
    """
    steps_per_epoch = run.schedule.steps_per_epoch
    epoch, skip = divmod(state.step, steps_per_epoch)
    # One loader per epoch, seeded by the epoch: same order and augmentation whether
    # or not the run was interrupted (the data never draws from these RNGs).
    loader = epoch_loader(dataset, run.batch_size, run.runtime, seed, epoch, run.dist, skip)
    wait = LoaderWait()
    batches = wait.batches(loader)
    run.ddp_model.train()
    set_train_mode(run.model, run.params.freeze_bn)
    started, losses, images = time.perf_counter(), [], 0
    for _ in range(skip, steps_per_epoch):
        # All ranks stop at the same step (torchrun signals each at its own moment).
        if any_rank(stop.is_set(), run.dist):
            state.losses += _mean_losses(losses, run.dist)
            return None
        inputs, targets, _ = next(batches)
        factor = run.schedule(state.step)
        set_lrs(run.optimizer, run.base_lrs, factor)
        losses.append(run.step(inputs, targets))
        state.log_step(epoch, [lr * factor for lr in run.base_lrs])
        images += len(targets) * run.dist.world_size
        state.step += 1
        if on_step is not None:
            on_step(state.step)
    del batches, loader
    seconds = time.perf_counter() - started
    state.losses += _mean_losses(losses, run.dist)
    return seconds, images, wait.seconds


def _mean_losses(losses: list[torch.Tensor], dist: DistContext) -> list[float]:
    """Per-step losses of the global batch (the mean over ranks of their local means)."""
    if not losses:
        return []
    return all_reduce_mean(torch.stack(losses).float(), dist).cpu().tolist()


def _end_epoch(
    run: Trainer,
    state: Progress,
    epoch: int,
    seconds: float,
    images: int,
    waited: float,
    valid_loader,
    valid_total: int | None,
) -> dict[str, Any]:
    """Validate, and append the epoch's history row (returned) to `state`."""
    valid_loss, valid_acc = evaluate(
        run.model, valid_loader, run.runtime, run.params.label_smoothing, run.dist, valid_total
    )
    epoch_losses = state.losses[-run.schedule.steps_per_epoch :]
    last_step = min(state.step, run.schedule.total_steps - 1)
    row = {
        "epoch": epoch,
        "train_loss": sum(epoch_losses) / len(epoch_losses),
        "valid_loss": valid_loss,
        "valid_acc": valid_acc,
        "lr": run.base_lrs[-1] * run.schedule(last_step),
        "seconds": seconds,
        "images_per_s": images / seconds if seconds > 0 else 0.0,
        "data_wait_share": waited / seconds if seconds > 0 else 0.0,
    }
    state.history.append(row)
    return row


def _result(run: Trainer, state: Progress, resumed_from: int | None) -> FinetuneResult:
    """The model in eval mode, steps.csv, history.csv, metrics and the layer groups."""
    steps = pd.DataFrame(
        {"step": range(len(state.lrs)), "epoch": state.epochs, "loss": state.losses}
    )
    for g in range(len(run.groups)):
        steps[f"lr_group{g}"] = [lrs[g] for lrs in state.lrs]
    last = state.history[-1]
    trained = [h for h in state.history if h["seconds"] > 0]
    metrics = {
        "valid_acc": last["valid_acc"],
        "valid_loss": last["valid_loss"],
        "train_loss": last["train_loss"],
        "epochs": len(state.history),
        "steps": len(state.lrs),
        # The loop's own throughput; bench/ sets it against the train-step limit.
        "images_per_s": sum(h["images_per_s"] for h in trained) / max(1, len(trained)),
        "data_wait_share": sum(h["data_wait_share"] for h in trained) / max(1, len(trained)),
        "peak_gpu_mib": peak_gpu_mib(run.runtime),
    }
    run.model.eval()
    report = layer_groups_report(run.model, run.groups, run.params.lr_ratios)
    history = pd.DataFrame(state.history)
    return FinetuneResult(run.model, history, steps, metrics, report, resumed_from)
