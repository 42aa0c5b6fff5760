"""What one fine-tune run is built from, and how it is checkpointed and resumed.

A `Trainer` holds the model and its DDP wrapper, one optimizer group per layer group,
the GradScaler and the schedule; `Progress` is what the loop has done with them. Both
go into the checkpoint at every epoch end, and come back from it on resume.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune.config import FinetuneParams
from visiontune.distributed import DistContext, all_gather_varlen, wrap_ddp
from visiontune.runtime import Runtime, prepare_module
from visiontune.train.checkpoint import (
    CheckpointFormatError,
    capture_rng,
    load_checkpoint,
    resume_mismatch,
    save_checkpoint,
)
from visiontune.train.groups import LayerGroup, create_layer_groups, create_param_groups
from visiontune.train.head import create_optimizer
from visiontune.train.schedules import Schedule, create_schedule, group_lrs
from visiontune.train.step import train_step

PHASE = "finetune"


@dataclass
class Progress:
    """What the fine-tune loop has done so far; saved in every checkpoint."""

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
    def from_dict(cls, data: dict[str, Any]) -> Progress:
        return cls(**data)


@dataclass(frozen=True)
class Trainer:
    """What stays fixed through one fine-tune (`create_trainer` builds it)."""

    model: nn.Module
    ddp_model: nn.Module  # `model` itself outside torchrun
    groups: list[LayerGroup]
    base_lrs: list[float]
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    schedule: Schedule
    batch_size: int  # the global batch
    params: FinetuneParams
    runtime: Runtime
    dist: DistContext

    @property
    def layout(self) -> list[dict[str, Any]]:
        return [{"name": g.name, "n_tensors": len(g.param_names)} for g in self.groups]

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch, at the LRs already set; the loss, on the device."""
        loss, _ = train_step(
            self.ddp_model, self.optimizer, inputs, targets,
            label_smoothing=self.params.label_smoothing, runtime=self.runtime, scaler=self.scaler,
        )  # fmt: skip
        return loss

    def resume(
        self, path: Path, config: dict[str, Any], log: Callable[[str], None]
    ) -> tuple[Progress, dict[str, Any] | None]:
        """The progress to start from and, when resuming, the RNG states to restore first.

        Resuming loads the checkpoint's weights, optimizer and scaler state; a checkpoint
        of another format or another run (`resume_mismatch`) is ignored, the reason logged.
        """
        state, rng = Progress(steps_per_epoch=self.schedule.steps_per_epoch), None
        try:
            saved = load_checkpoint(path)
        except CheckpointFormatError as exc:
            log(f"finetune: not resuming: {exc}; starting fresh")
            saved = None
        why = saved and resume_mismatch(saved, config, self.layout, self.schedule.cycle_steps)
        if why:
            log(f"finetune: not resuming from {path}: {why}; starting fresh")
        elif saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scaler.load_state_dict(saved["scaler"])
            state, rng = Progress.from_dict(saved["progress"]), saved["rng"]
            log(f"finetune: resuming from {path} at step {state.step}")
        if self.dist.enabled:
            steps = all_gather_varlen(torch.tensor([state.step]), self.dist)
            starts = [int(t.item()) for t in steps]
            if len(set(starts)) > 1:
                raise RuntimeError(
                    f"ranks would resume from different steps {starts}: the checkpoint "
                    f"folder {path.parent} must be on storage every node shares"
                )
        return state, rng

    def save(self, path: Path, state: Progress, config: dict[str, Any]) -> None:
        """Checkpoint everything a resume needs (rank 0 only: the ranks are in sync)."""
        if not self.dist.is_main:
            return
        schedule = {"kind": self.schedule.kind, "cycle_steps": list(self.schedule.cycle_steps)}
        save_checkpoint(
            path,
            {
                "phase": PHASE,
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "schedule": schedule,
                "progress": state.to_dict(),
                "param_groups": self.layout,
                "rng": capture_rng(),
                "config": config,
            },
        )


def create_trainer(
    model: nn.Module,
    n_images: int,
    params: FinetuneParams,
    runtime: Runtime,
    *,
    lr: float,
    dist: DistContext,
    sync_bn: bool = False,
    valid_total: int | None = None,
) -> Trainer:
    """Check the global batch against the processes, wrap the model (DDP under torchrun),
    and build one optimizer group per layer group, the GradScaler and the schedule."""
    prepare_module(model, runtime)
    batch_size = min(params.batch_size, n_images)
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
    schedule = create_schedule(
        params.schedule,
        steps_per_epoch=n_images // batch_size,
        n_cycles=params.n_cycles,
        cycle_len=params.cycle_len,
        cycle_mult=params.cycle_mult,
        warmup_pct=params.warmup_pct,
        min_lr_ratio=params.min_lr_ratio,
    )
    return Trainer(
        model, ddp_model, groups, base_lrs, optimizer, scaler, schedule, batch_size,
        params, runtime, dist,
    )  # fmt: skip
