"""LR schedules as pure functions of the global step (SGDR, one-cycle): a multiplier of each
param group's base LR, so the ratios between layer groups stay constant by construction."""

from __future__ import annotations

import itertools
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
        return tuple(itertools.accumulate(self.cycle_steps[:-1], initial=0))

    def __call__(self, step: int) -> float:
        """SGDR (Loshchilov & Hutter) unless one-cycle: cosine from 1 to `min_lr_ratio` in each
        cycle, the first `warmup_steps` at 1/100 (the course's warm-up), then `min_lr_ratio`."""
        if self.kind == "one_cycle":
            return self._one_cycle(step)
        if step < self.warmup_steps:
            return 1.0 / WARMUP_DIV
        for start, length in zip(self.restarts, self.cycle_steps, strict=True):
            if step < start + length:
                cosine = 0.5 * (1.0 + math.cos(math.pi * (step - start) / length))
                return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine
        return self.min_lr_ratio

    def _one_cycle(self, step: int) -> float:
        """torch's OneCycleLR (cosine, two phases): from 1/25 up to 1 over the first
        `pct_start` of the steps, then down to `min_lr_ratio` (torch's 1/25/1e4 when 0)."""
        initial = 1.0 / ONE_CYCLE_DIV
        final = self.min_lr_ratio if self.min_lr_ratio > 0 else initial / ONE_CYCLE_FINAL_DIV
        peak_step = float(self.pct_start * self.total_steps) - 1
        last_step = self.total_steps - 1
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
    """A schedule from the cycle geometry (fastai's `fit_sgdr` epoch count); one-cycle runs
    the same epochs as one cycle, `warmup_pct` its rising fraction (0: torch's 0.25)."""
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
    return [lr * ratio for ratio in lr_ratios]


def set_lrs(optimizer: torch.optim.Optimizer, base_lrs: Sequence[float], factor: float) -> None:
    """Apply `factor` × each group's base LR to an optimizer whose groups carry `layer_group`."""
    for group in optimizer.param_groups:
        group["lr"] = base_lrs[group.get("layer_group", 0)] * factor
