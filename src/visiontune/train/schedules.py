"""Learning-rate schedules as pure functions of the global step (SGDR and one-cycle).

A schedule maps a step to a multiplier of each param group's base LR, so the ratios
between layer groups (differential LRs) stay constant at every step by construction.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

ScheduleKind = Literal["sgdr", "one_cycle"]

# torch.optim.lr_scheduler.OneCycleLR defaults: start at lr/25, end at lr/25/1e4.
ONE_CYCLE_DIV = 25.0
ONE_CYCLE_FINAL_DIV = 1.0e4
ONE_CYCLE_PCT_START = 0.25
# fastai 0.7 warmed up at lr/100 for the first 5 % of the first cycle (`use_clr` off).
WARMUP_DIV = 100.0


@dataclass(frozen=True)
class Schedule:
    """An LR multiplier per global step; `cycle_steps` are the SGDR cycle lengths."""

    kind: ScheduleKind
    steps_per_epoch: int
    cycle_steps: tuple[int, ...]
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    pct_start: float = ONE_CYCLE_PCT_START

    @property
    def total_steps(self) -> int:
        return sum(self.cycle_steps)

    @property
    def epochs(self) -> int:
        return self.total_steps // self.steps_per_epoch

    @property
    def restarts(self) -> tuple[int, ...]:
        """Global steps at which a new cycle starts (the LR jumps back to its maximum)."""
        starts = [0]
        for length in self.cycle_steps[:-1]:
            starts.append(starts[-1] + length)
        return tuple(starts)

    def __call__(self, step: int) -> float:
        if self.kind == "sgdr":
            return sgdr_factor(step, self.cycle_steps, self.warmup_steps, self.min_lr_ratio)
        return one_cycle_factor(step, self.total_steps, self.pct_start, self.min_lr_ratio)


def sgdr_factor(
    step: int, cycle_steps: Sequence[int], warmup_steps: int = 0, min_lr_ratio: float = 0.0
) -> float:
    """SGDR (Loshchilov & Hutter): cosine from 1 to `min_lr_ratio` within each cycle.

    The first `warmup_steps` of the first cycle run at 1/100 instead of the cosine (the
    course's warm-up); steps past the last cycle stay at `min_lr_ratio`.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return 1.0 / WARMUP_DIV
    start = 0
    for length in cycle_steps:
        if step < start + length:
            cosine = 0.5 * (1.0 + math.cos(math.pi * (step - start) / length))
            return min_lr_ratio + (1.0 - min_lr_ratio) * cosine
        start += length
    return min_lr_ratio


def one_cycle_factor(
    step: int,
    total_steps: int,
    pct_start: float = ONE_CYCLE_PCT_START,
    min_lr_ratio: float = 0.0,
) -> float:
    """One-cycle (Smith), as torch's OneCycleLR with cosine annealing and two phases.

    Rises from 1/25 to 1 over the first `pct_start` of the steps, then anneals to
    `min_lr_ratio` (torch's default 1/25/1e4 when it is 0).
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    initial = 1.0 / ONE_CYCLE_DIV
    final = min_lr_ratio if min_lr_ratio > 0 else initial / ONE_CYCLE_FINAL_DIV
    peak_step = float(pct_start * total_steps) - 1
    last_step = total_steps - 1
    step = min(step, last_step)
    if step <= peak_step:
        start_value, end_value, pct = initial, 1.0, step / peak_step
    else:
        start_value, end_value = 1.0, final
        pct = (step - peak_step) / (last_step - peak_step)
    return end_value + (start_value - end_value) / 2.0 * (math.cos(math.pi * pct) + 1)


def create_schedule(
    kind: ScheduleKind,
    *,
    steps_per_epoch: int,
    n_cycles: int = 1,
    cycle_len: int = 1,
    cycle_mult: int = 1,
    warmup_pct: float = 0.0,
    min_lr_ratio: float = 0.0,
) -> Schedule:
    """Build a schedule from the cycle geometry (fastai's `fit_sgdr` epoch count).

    For one-cycle the whole run (the same number of epochs as SGDR would take) is one
    cycle and `warmup_pct` is the rising fraction (0 = torch's 0.25).
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}")
    epochs = [cycle_len * cycle_mult**i for i in range(n_cycles)]
    if kind == "sgdr":
        cycles = tuple(e * steps_per_epoch for e in epochs)
        warmup = math.floor(warmup_pct * cycles[0])
        return Schedule("sgdr", steps_per_epoch, cycles, warmup, min_lr_ratio)
    if kind == "one_cycle":
        total = sum(epochs) * steps_per_epoch
        pct = warmup_pct if warmup_pct > 0 else ONE_CYCLE_PCT_START
        if pct * total < 2:
            raise ValueError(f"one_cycle needs at least 2 rising steps; got {total} steps in all")
        return Schedule("one_cycle", steps_per_epoch, (total,), 0, min_lr_ratio, pct)
    raise ValueError(f"unknown schedule {kind!r}; use 'sgdr' or 'one_cycle'")


def group_lrs(lr: float, lr_ratios: Sequence[float]) -> list[float]:
    """Base LR of every layer group: the top LR times each group's ratio."""
    if isinstance(lr_ratios, str):  # "auto" is decided from the head: resolve_finetune
        raise ValueError(f"lr_ratios {lr_ratios!r} must be resolved to numbers first")
    return [lr * ratio for ratio in lr_ratios]


def set_lrs(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Apply `factor` × each group's base LR to an optimizer whose groups carry `layer_group`."""
    for group in optimizer.param_groups:
        group["lr"] = base_lrs[group.get("layer_group", 0)] * factor
