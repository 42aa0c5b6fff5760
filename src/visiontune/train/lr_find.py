"""The LR range test (Smith; fastai's `lr_find`) and its suggestions: `lr_range_test` sweeps
any one-step training function, `find_lr` a model and optimizer put back exactly afterwards."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from visiontune.train.schedules import set_lrs


@dataclass(frozen=True)
class LrFindResult:
    """The curve (step, lr, loss, smoothed_loss) and every method's suggested LR."""

    curve: pd.DataFrame
    suggestions: dict[str, float]
    stopped_early: bool

    def suggestion(self, method: str) -> float:
        return self.suggestions[method]


def exponential_lrs(start_lr: float, end_lr: float, num_iter: int) -> np.ndarray:
    """LR of each mini-batch, growing geometrically from start_lr to end_lr (inclusive)."""
    return start_lr * (end_lr / start_lr) ** (np.arange(num_iter) / (num_iter - 1))


def valley_index(losses: Sequence[float]) -> int:
    """fastai's `valley`: `sections + sections / 2` (sections = length / 3) into the longest
    (not necessarily contiguous) decreasing run of the loss."""
    n = len(losses)
    lds = [1] * n
    max_start = max_end = 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and lds[i] < lds[j] + 1:
                lds[i] = lds[j] + 1
            if lds[max_end] < lds[i]:
                max_end = i
                max_start = max_end - lds[max_end]
    sections = (max_end - max_start) / 3
    return max_start + int(sections) + int(sections / 2)


def slide_index(losses: Sequence[float], lr_diff: int = 15, thresh: float = 0.005) -> int | None:
    """fastai's `slide`: walk back from the divergence until the loss gradients at the ends
    of a `lr_diff`-point window (shrunk to fit) agree within `thresh`. It anchors on the
    take-off, so it works on a curve flat until it diverges (after a trained head). None
    when the walk reaches the start (a noisy plateau): not the smallest LR tried."""
    grads = np.gradient(np.asarray(losses, dtype=np.float64))
    n = len(grads)
    window = min(lr_diff, n - 1)
    right, left = n - 1, n - 1 - window
    found = left
    while left >= 0 and abs(grads[right] - grads[left]) > thresh:
        found = left
        right, left = right - 1, left - 1
    return None if left < 0 else found


def takeoff_index(losses: Sequence[float], rise: float = 1.5) -> int:
    """The last point at or below `rise` × the plateau (the median of the curve's first half):
    where the loss leaves its plateau for good, whatever the noise on it."""
    values = np.asarray(losses, dtype=np.float64)
    plateau = float(np.median(values[: max(1, len(values) // 2)]))
    below = np.flatnonzero(values <= rise * plateau)
    return int(below[-1]) if len(below) else 0


def suggest_lrs(lrs: Sequence[float], smoothed_losses: Sequence[float]) -> dict[str, float]:
    """Every suggestion method on a smoothed curve, trimmed like fastai (first 10 %, last 5)."""
    losses = np.asarray(smoothed_losses, dtype=np.float64)
    finite = np.isfinite(losses)
    lrs_arr, losses = np.asarray(lrs, dtype=np.float64)[finite], losses[finite]
    n = len(losses)
    if n < 3:
        raise ValueError(f"the LR finder recorded only {n} usable points; raise lr_find.num_iter")
    lo, hi = n // 10, n - 5 if n - 5 - n // 10 >= 3 else n
    lrs_arr, losses = lrs_arr[lo:hi], losses[lo:hi]
    grads = np.diff(losses) / np.diff(np.log(lrs_arr))
    slide = slide_index(losses.tolist())
    # /30, not /10: at a tenth dogbreeds (120 classes, 7 photos each) fell from 87.8 to
    # 79.0 % in 3 epochs; at a thirtieth 86.8 % (slide's on that split), defects 54.5 %.
    takeoff = float(lrs_arr[takeoff_index(losses.tolist())] / 30)
    return {
        "min/10": float(lrs_arr[int(np.argmin(losses))] / 10),
        "steepest": float(lrs_arr[int(np.argmin(grads))]),
        "valley": float(lrs_arr[valley_index(losses.tolist())]),
        "slide": float(lrs_arr[slide]) if slide is not None else takeoff,
        "takeoff/30": takeoff,
    }


def lr_range_test(
    step: Callable[[float], float],
    *,
    start_lr: float,
    end_lr: float,
    num_iter: int,
    smooth: float,
    diverge: float,
) -> LrFindResult:
    """Call `step(lr)` (one training step, returns its loss) for exponentially growing LRs,
    until the debiased EMA of the loss is not finite or over `diverge` × its best, counted
    from the 10th iteration (or 10 %) on: after a trained head the first batch or two can
    be several times lower than the next by noise alone."""
    rows: list[tuple[int, float, float, float]] = []
    avg, best, stopped = 0.0, math.inf, False
    settle = max(10, num_iter // 10)
    for i, lr in enumerate(exponential_lrs(start_lr, end_lr, num_iter)):
        loss = float(step(float(lr)))
        avg = smooth * avg + (1 - smooth) * loss
        smoothed = avg / (1 - smooth ** (i + 1))
        rows.append((i, float(lr), loss, smoothed))
        if not math.isfinite(smoothed) or smoothed > diverge * best:
            stopped = True
            break
        if i >= settle - 1:
            best = min(best, smoothed)
    curve = pd.DataFrame(rows, columns=["step", "lr", "loss", "smoothed_loss"])
    return LrFindResult(curve, suggest_lrs(curve["lr"], curve["smoothed_loss"]), stopped)


def find_lr(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
    train_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    lr_ratios: Sequence[float],
    **sweep: Any,
) -> LrFindResult:
    """`lr_range_test` (`sweep`: its keywords) of one LR × `lr_ratios`, group `layer_group` g
    at lr × lr_ratios[g], so the suggestion is what `finetune.lr` means; then weights,
    optimizer and RNG are put back. `train_step(x, y)` trains on a batch, returns the loss."""
    model_state = copy.deepcopy(model.state_dict())
    optim_state = copy.deepcopy(optimizer.state_dict())
    rng_state = torch.get_rng_state()

    def step(lr: float) -> float:
        set_lrs(optimizer, lr_ratios, lr)
        return float(train_step(*next(batches)).detach())

    try:
        return lr_range_test(step, **sweep)
    finally:
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        torch.set_rng_state(rng_state)
