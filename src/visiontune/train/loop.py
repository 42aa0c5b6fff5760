"""The fine-tune loop: scheduled differential LRs at every step, the loss kept on the device
(no host sync per step), a checkpoint at each epoch end or stop, a resume to the same weights."""

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
from visiontune.train.checkpoint import CHECKPOINT_NAME
from visiontune.train.epoch import epoch_loader, evaluate, set_train_mode
from visiontune.train.groups import layer_groups_report
from visiontune.train.schedules import set_lrs
from visiontune.train.trainer import Progress, Trainer


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
    """Fine-tune `model` (`.body` + `.head`), resuming from a checkpoint of the same `config`.

    Raises TrainingInterrupted after checkpointing when `stop` gets set. `on_step` gets the
    steps done; `on_epoch` (rank 0) each history row before its checkpoint, so whatever it
    draws from the RNGs a resumed run draws alike. Under torchrun `params.batch_size` is the
    global batch (`epoch_loader`) and `valid_loader` this rank's shard of `valid_total`."""
    if dist.enabled and (valid_total or 0) < dist.world_size:
        raise ValueError(
            f"{valid_total} validation images for {dist.world_size} processes: "
            "every process needs at least one"
        )
    stop = stop or threading.Event()
    run = Trainer(model, len(train_dataset), params, runtime, lr=lr, dist=dist, sync_bn=sync_bn)
    path = Path(checkpoint_dir) / CHECKPOINT_NAME
    state, resumed_from = run.resume(path, config, log)
    while state.step < run.schedule.total_steps:
        epoch = state.step // run.schedule.steps_per_epoch
        timed = _train_epoch(run, state, train_dataset, seed, stop, on_step)
        if timed is None:
            run.save(path, state, config)
            barrier(dist)  # the checkpoint is on disk before any rank exits
            raise TrainingInterrupted(f"stopped at step {state.step}; checkpoint {path}")
        seconds, images, waited = timed
        valid_loss, valid_acc = evaluate(
            model, valid_loader, runtime, params.label_smoothing, dist, valid_total
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
            "images_per_s": images / seconds,
            "data_wait_share": waited / seconds,
        }
        state.history.append(row)
        log(
            f"finetune: epoch {epoch + 1}/{run.schedule.epochs} train_loss "
            f"{row['train_loss']:.4f} valid_loss {valid_loss:.4f} "
            f"valid_acc {valid_acc:.4f} ({row['images_per_s']:.1f} img/s)"
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
    """Train the rest of the current epoch, one scheduled step per batch, the losses into
    `state`. Returns its seconds, images (all ranks) and seconds waiting for batches, or None
    when `stop` was set on any rank before its end."""
    steps_per_epoch = run.schedule.steps_per_epoch
    epoch, skip = divmod(state.step, steps_per_epoch)
    # The epoch's own seeded loader: the same order and augmentation after a resume.
    loader = epoch_loader(dataset, run.batch_size, run.runtime, seed, epoch, run.dist, skip)
    wait = LoaderWait()
    batches = wait.batches(loader)
    run.ddp_model.train()
    set_train_mode(run.model, run.params.freeze_bn)
    started, losses, images, stopped = time.perf_counter(), [], 0, False
    for _ in range(skip, steps_per_epoch):
        # All ranks stop at the same step (torchrun signals each at its own moment).
        if stopped := any_rank(stop.is_set(), run.dist):
            break
        inputs, targets, _ = next(batches)
        factor = run.schedule(state.step)
        set_lrs(run.optimizer, run.base_lrs, factor)
        losses.append(run.step(inputs, targets))
        state.epochs.append(epoch)
        state.lrs.append([lr * factor for lr in run.base_lrs])
        images += len(targets) * run.dist.world_size
        state.step += 1
        if on_step is not None:
            on_step(state.step)
    del batches, loader
    seconds = time.perf_counter() - started
    if losses:  # the global batch's: the mean over ranks of their local means
        state.losses += all_reduce_mean(torch.stack(losses).float(), run.dist).cpu().tolist()
    return None if stopped else (seconds, images, wait.seconds)


def _result(run: Trainer, state: Progress, resumed_from: int | None) -> FinetuneResult:
    """The model in eval mode, steps.csv, history.csv, metrics and the layer groups."""
    steps = pd.DataFrame(
        {"step": range(len(state.lrs)), "epoch": state.epochs, "loss": state.losses}
    ).join(pd.DataFrame(state.lrs).add_prefix("lr_group"))
    history = pd.DataFrame(state.history)
    metrics = {
        **{key: state.history[-1][key] for key in ("valid_acc", "valid_loss", "train_loss")},
        "epochs": len(history),
        "steps": len(steps),
        # The loop's own throughput; bench/ sets it against the train-step limit.
        "images_per_s": float(history["images_per_s"].mean()),
        "data_wait_share": float(history["data_wait_share"].mean()),
        "peak_gpu_mib": peak_gpu_mib(run.runtime),
    }
    report = layer_groups_report(run.model.eval(), run.groups, run.params.lr_ratios)
    return FinetuneResult(run.model, history, steps, metrics, report, resumed_from)
