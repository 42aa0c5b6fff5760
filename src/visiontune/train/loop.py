"""The fine-tune loop: unfrozen body, differential LRs, SGDR/one-cycle per step, resumable.

One optimizer group per layer group; the LR of every group is set from the pure schedule
at every step. The loop keeps the loss on the device (no host sync per step), checkpoints
at every epoch end and when asked to stop, and resumes to the same final weights.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DistributedSampler

from visiontune.config import FinetuneParams
from visiontune.data.dataset import create_loader
from visiontune.distributed import (
    SINGLE,
    DistContext,
    all_gather_varlen,
    all_reduce_mean,
    any_rank,
    barrier,
    check_in_sync,
    gather_shards,
    wrap_ddp,
)
from visiontune.inference import run_inference
from visiontune.runtime import Runtime, autocast, prepare_module, to_device
from visiontune.train.checkpoint import (
    CHECKPOINT_NAME,
    CheckpointFormatError,
    capture_rng,
    config_differences,
    load_checkpoint,
    restore_rng,
    save_checkpoint,
)
from visiontune.train.groups import create_layer_groups, create_param_groups, layer_groups_report
from visiontune.train.head import create_optimizer
from visiontune.train.schedules import Schedule, create_schedule, group_lrs, set_lrs

PHASE = "finetune"


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


def set_train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Train mode; with `freeze_bn` the body's BatchNorm layers keep their running stats.

    A logistic-regression head's BatchNorm keeps its statistics too (`head_stats_fixed`):
    they are the standardisation its weights were fitted for. Left to track augmented
    training batches, they alone cost digits 1.1 points and raised its valid loss
    0.31 -> 0.37 in one epoch at an LR too small to move a weight.
    """
    model.train()
    frozen = [model.body] if freeze_bn else []
    if getattr(model, "head_stats_fixed", False):
        frozen.append(model.head)
    for part in frozen:
        for module in part.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def evaluate(
    model: nn.Module,
    loader,
    runtime: Runtime,
    label_smoothing: float = 0.0,
    dist: DistContext = SINGLE,
    total: int | None = None,
):
    """(valid loss, valid accuracy) without TTA.

    Under torchrun `loader` holds this rank's shard of the `total` validation images
    (`distributed.shard`); the logits are gathered so every image counts exactly once.
    """
    logits, labels, _ = run_inference(model, loader, runtime, desc="valid")
    if dist.enabled:
        if total is None:
            raise ValueError("evaluate under torchrun needs the total number of images")
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
    """This rank's training batches of `epoch`: batch_size / world_size images each.

    Every world size walks the same seeded permutation of the epoch and each rank takes
    every world_size-th image of it (DistributedSampler, tail dropped), so global batch k
    holds exactly the images of a single process's batch k, augmented alike: each image's
    augmentation is seeded from (seed + epoch, index), not from a worker's or a rank's RNG.
    `skip_batches` starts the epoch that many batches in, without decoding them.
    """
    sampler = DistributedSampler(
        dataset,
        num_replicas=dist.world_size,
        rank=dist.rank,
        shuffle=True,
        seed=seed,
        drop_last=True,
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
    log: Callable[[str], None] = print,
    dist: DistContext = SINGLE,
    sync_bn: bool = False,
    valid_total: int | None = None,
) -> FinetuneResult:
    """Fine-tune `model` (`.body` + `.head`) on `train_dataset`; resume from checkpoint_dir.

    A checkpoint whose `config` differs from `config` is ignored (and the reason logged).
    Raises TrainingInterrupted after checkpointing when `stop` gets set.

    Under torchrun (`dist`) the model is wrapped in DistributedDataParallel and
    `params.batch_size` is the global batch: each rank takes batch_size / world_size images
    of it (a DistributedSampler over the same per-epoch permutation a single process
    walks), so one step sees the same images, averages the same gradient and applies the
    same LR whatever the world size. `valid_loader` holds this rank's shard of the
    `valid_total` validation images. Only rank 0 writes checkpoints.
    """
    stop = stop or threading.Event()
    prepare_module(model, runtime)
    batch_size = min(params.batch_size, len(train_dataset))
    if batch_size % dist.world_size:
        raise ValueError(
            f"the global batch ({batch_size}, finetune.batch_size) must be divisible by the "
            f"number of processes ({dist.world_size})"
        )
    if dist.enabled and (valid_total or 0) < dist.world_size:
        raise ValueError(
            f"{valid_total} validation images for {dist.world_size} processes: "
            "every process needs at least one"
        )
    ddp_model = wrap_ddp(model, dist, runtime, sync_bn)
    groups = create_layer_groups(model, params.layer_groups)
    base_lrs = group_lrs(lr, params.lr_ratios)
    param_groups = create_param_groups(model, groups, base_lrs, params.weight_decay)
    optimizer = create_optimizer(
        param_groups, params.optimizer, lr, params.weight_decay, params.momentum
    )
    scaler = torch.amp.GradScaler(runtime.device.type, enabled=runtime.amp_dtype == torch.float16)
    steps_per_epoch = len(train_dataset) // batch_size
    schedule = create_schedule(
        params.schedule,
        steps_per_epoch=steps_per_epoch,
        n_cycles=params.n_cycles,
        cycle_len=params.cycle_len,
        cycle_mult=params.cycle_mult,
        warmup_pct=params.warmup_pct,
        min_lr_ratio=params.min_lr_ratio,
    )
    layout = [{"name": g.name, "n_tensors": len(g.param_names)} for g in groups]
    state = _Progress(steps_per_epoch=steps_per_epoch)
    checkpoint_path = Path(checkpoint_dir) / CHECKPOINT_NAME
    try:
        saved = load_checkpoint(checkpoint_path)
    except CheckpointFormatError as exc:
        log(f"finetune: not resuming: {exc}; starting fresh")
        saved = None
    resumed_from = None
    if saved is not None:
        why = _incompatible(saved, config, layout, schedule)
        if why:
            log(f"finetune: not resuming from {checkpoint_path}: {why}; starting fresh")
        else:
            model.load_state_dict(saved["model"])
            optimizer.load_state_dict(saved["optimizer"])
            scaler.load_state_dict(saved["scaler"])
            state = _Progress.from_dict(saved["progress"])
            resumed_from = state.step
            log(f"finetune: resuming from {checkpoint_path} at step {state.step}")
    if dist.enabled:
        starts = [int(t.item()) for t in all_gather_varlen(torch.tensor([state.step]), dist)]
        if len(set(starts)) > 1:
            raise RuntimeError(
                f"ranks would resume from different steps {starts}: the checkpoint folder "
                f"{checkpoint_dir} must be on storage every node shares"
            )

    def checkpoint() -> None:
        if not dist.is_main:
            return
        save_checkpoint(
            checkpoint_path,
            {
                "phase": PHASE,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict(),
                "schedule": {"kind": schedule.kind, "cycle_steps": list(schedule.cycle_steps)},
                "progress": state.to_dict(),
                "param_groups": layout,
                "rng": capture_rng(),
                "config": config,
            },
        )

    while state.step < schedule.total_steps:
        epoch = state.step // steps_per_epoch
        skip = state.step - epoch * steps_per_epoch
        if resumed_from is not None and state.step == resumed_from:
            restore_rng(saved["rng"])  # the RNGs as they were at the interruption
        # One loader per epoch, seeded by the epoch: same order and augmentation whether
        # or not the run was interrupted (the data never draws from these RNGs).
        loader = epoch_loader(train_dataset, batch_size, runtime, seed, epoch, dist, skip)
        batches = iter(loader)
        ddp_model.train()
        set_train_mode(model, params.freeze_bn)
        started, losses, images = time.perf_counter(), [], 0
        for _ in range(skip, steps_per_epoch):
            # All ranks stop at the same step (torchrun signals each at its own moment).
            if any_rank(stop.is_set(), dist):
                state.losses += _mean_losses(losses, dist)
                checkpoint()
                barrier(dist)  # the checkpoint is on disk before any rank exits
                raise TrainingInterrupted(
                    f"stopped at step {state.step}; checkpoint {checkpoint_path}"
                )
            inputs, targets, _ = next(batches)
            factor = schedule(state.step)
            set_lrs(optimizer, base_lrs, factor)
            loss = _train_step(ddp_model, optimizer, scaler, inputs, targets, runtime, params)
            losses.append(loss)
            state.log_step(epoch, [lr * factor for lr in base_lrs])
            images += len(targets) * dist.world_size
            state.step += 1
            if on_step is not None:
                on_step(state.step)
        del batches, loader
        seconds = time.perf_counter() - started
        state.losses += _mean_losses(losses, dist)
        valid_loss, valid_acc = evaluate(
            model, valid_loader, runtime, params.label_smoothing, dist, valid_total
        )
        epoch_losses = state.losses[-steps_per_epoch:]
        state.history.append(
            {
                "epoch": epoch,
                "train_loss": sum(epoch_losses) / len(epoch_losses),
                "valid_loss": valid_loss,
                "valid_acc": valid_acc,
                "lr": base_lrs[-1] * schedule(min(state.step, schedule.total_steps - 1)),
                "seconds": seconds,
                "images_per_s": images / seconds if seconds > 0 else 0.0,
            }
        )
        log(
            f"finetune: epoch {epoch + 1}/{schedule.epochs} train_loss "
            f"{state.history[-1]['train_loss']:.4f} valid_loss {valid_loss:.4f} "
            f"valid_acc {valid_acc:.4f} ({images / seconds:.1f} img/s)"
        )
        checkpoint()
    check_in_sync(model, dist)
    return _result(model, state, groups, params, resumed_from)


def _mean_losses(losses: list[torch.Tensor], dist: DistContext) -> list[float]:
    """Per-step losses of the global batch (the mean over ranks of their local means)."""
    if not losses:
        return []
    return all_reduce_mean(torch.stack(losses).float(), dist).cpu().tolist()


def _train_step(model, optimizer, scaler, inputs, targets, runtime, params) -> torch.Tensor:
    inputs, targets = to_device(inputs, runtime), to_device(targets, runtime)
    with autocast(runtime):
        logits = model(inputs)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=params.label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def _incompatible(saved: dict, config: dict, layout: list, schedule: Schedule) -> str | None:
    diffs = config_differences(saved.get("config", {}), config)
    if diffs:
        return f"its config differs in {', '.join(diffs[:8])}"
    if saved.get("param_groups") != layout:
        return "its param-group layout differs"
    if saved["schedule"]["cycle_steps"] != list(schedule.cycle_steps):
        return "its schedule differs (steps per epoch changed)"
    return None


@dataclass
class _Progress:
    """What the loop has done so far; saved in every checkpoint."""

    steps_per_epoch: int
    step: int = 0
    losses: list[float] | None = None
    lrs: list[list[float]] | None = None
    epochs: list[int] | None = None
    history: list[dict[str, Any]] | None = None

    def __post_init__(self) -> None:
        self.losses = self.losses or []
        self.lrs = self.lrs or []
        self.epochs = self.epochs or []
        self.history = self.history or []

    def log_step(self, epoch: int, lrs: Sequence[float]) -> None:
        self.epochs.append(epoch)
        self.lrs.append(list(lrs))

    def to_dict(self) -> dict[str, Any]:
        return dict(vars(self))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> _Progress:
        return cls(**data)


def _result(
    model, state: _Progress, groups, params: FinetuneParams, resumed_from
) -> FinetuneResult:
    steps = pd.DataFrame(
        {"step": range(len(state.lrs)), "epoch": state.epochs, "loss": state.losses}
    )
    for g in range(len(groups)):
        steps[f"lr_group{g}"] = [lrs[g] for lrs in state.lrs]
    history = pd.DataFrame(state.history)
    last = state.history[-1]
    trained = [h for h in state.history if h["seconds"] > 0]
    metrics = {
        "valid_acc": last["valid_acc"],
        "valid_loss": last["valid_loss"],
        "train_loss": last["train_loss"],
        "epochs": len(state.history),
        "steps": len(state.lrs),
        "images_per_s": sum(h["images_per_s"] for h in trained) / max(1, len(trained)),
    }
    model.eval()
    report = layer_groups_report(model, groups, params.lr_ratios)
    return FinetuneResult(model, history, steps, metrics, report, resumed_from)
