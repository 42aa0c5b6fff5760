"""What one fine-tune run is built from (`Trainer`) and has done (`Progress`), and how both
are checkpointed at every epoch end and come back on resume."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune.config import FinetuneParams
from visiontune.distributed import SINGLE, DistContext, all_gather_varlen, wrap_ddp
from visiontune.runtime import Runtime, prepare_module
from visiontune.train.checkpoint import (
    capture_rng,
    load_checkpoint,
    restore_rng,
    resume_mismatch,
    save_checkpoint,
)
from visiontune.train.groups import create_layer_groups, create_param_groups
from visiontune.train.head import create_optimizer
from visiontune.train.schedules import create_schedule, group_lrs
from visiontune.train.step import train_step


@dataclass
class Progress:
    """What the fine-tune loop has done so far; saved in every checkpoint."""

    steps_per_epoch: int
    step: int = 0
    losses: list[float] = field(default_factory=list)
    lrs: list[list[float]] = field(default_factory=list)
    epochs: list[int] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """What stays fixed through one fine-tune: the model and its DDP wrapper (the model itself
    outside torchrun), one optimizer group per layer group, the GradScaler and the schedule."""

    def __init__(
        self,
        model: nn.Module,
        n_images: int,
        params: FinetuneParams,
        runtime: Runtime,
        *,
        lr: float,
        dist: DistContext = SINGLE,
        sync_bn: bool = False,
    ) -> None:
        prepare_module(model, runtime)
        self.batch_size = min(params.batch_size, n_images)  # the global batch
        if self.batch_size % dist.world_size:
            raise ValueError(
                f"the global batch ({self.batch_size}, finetune.batch_size) must be divisible "
                f"by the number of processes ({dist.world_size})"
            )
        self.model, self.params, self.runtime, self.dist = model, params, runtime, dist
        self.ddp_model = wrap_ddp(model, dist, runtime, sync_bn)
        self.groups = create_layer_groups(model, params.layer_groups)
        self.layout = [{"name": g.name, "n_tensors": len(g.param_names)} for g in self.groups]
        self.base_lrs = group_lrs(lr, params.lr_ratios)
        param_groups = create_param_groups(model, self.groups, self.base_lrs, params.weight_decay)
        self.optimizer = create_optimizer(
            param_groups, params.optimizer, lr, params.weight_decay, params.momentum
        )
        fp16 = runtime.amp_dtype == torch.float16
        self.scaler = torch.amp.GradScaler(runtime.device.type, enabled=fp16)
        geometry = {"n_cycles", "cycle_len", "cycle_mult", "warmup_pct", "min_lr_ratio"}
        self.schedule = create_schedule(
            params.schedule,
            steps_per_epoch=n_images // self.batch_size,
            **params.model_dump(include=geometry),
        )

    def step(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch, at the LRs already set; the loss, on the device."""
        return train_step(
            self.ddp_model,
            self.optimizer,
            inputs,
            targets,
            label_smoothing=self.params.label_smoothing,
            runtime=self.runtime,
            scaler=self.scaler,
        )[0]

    def resume(
        self, path: Path, config: dict[str, Any], log: Callable[[str], None]
    ) -> tuple[Progress, int | None]:
        """The progress to start from and the step resumed from (None: a fresh start). A
        resume loads weights, optimizer, scaler and RNG states; a checkpoint of another
        format or run (`resume_mismatch`) is ignored, the reason logged."""
        state, resumed_from = Progress(steps_per_epoch=self.schedule.steps_per_epoch), None
        saved = load_checkpoint(path)
        why = saved and resume_mismatch(saved, config, self.layout, self.schedule.cycle_steps)
        if why:
            log(f"finetune: not resuming from {path}: {why}; starting fresh")
        elif saved is not None:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.scaler.load_state_dict(saved["scaler"])
            restore_rng(saved["rng"])  # the RNGs as they were at the interruption
            state = Progress(**saved["progress"])
            resumed_from = state.step
            log(f"finetune: resuming from {path} at step {state.step}")
        starts = [int(t.item()) for t in all_gather_varlen(torch.tensor([state.step]), self.dist)]
        if len(set(starts)) > 1:
            raise RuntimeError(
                f"ranks would resume from different steps {starts}: the checkpoint "
                f"folder {path.parent} must be on storage every node shares"
            )
        return state, resumed_from

    def save(self, path: Path, state: Progress, config: dict[str, Any]) -> None:
        """Checkpoint everything a resume needs (rank 0 only: the ranks are in sync)."""
        if not self.dist.is_main:
            return
        schedule = {"kind": self.schedule.kind, "cycle_steps": list(self.schedule.cycle_steps)}
        save_checkpoint(
            path,
            {
                "phase": "finetune",
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(),
                "schedule": schedule,
                "progress": vars(state),
                "param_groups": self.layout,
                "rng": capture_rng(),
                "config": config,
            },
        )
