"""SGDR / one-cycle: the LR applied at every step equals the closed form, on a tiny optimizer."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from real_config import default_section
from timm.scheduler import CosineLRScheduler

from visiontune.config import FinetuneParams
from visiontune.train.schedules import create_schedule, group_lrs, set_lrs

RATIOS = (0.01, 0.1, 1.0)


def tiny_optimizer(n_groups: int = 3, lr: float = 1.0) -> torch.optim.SGD:
    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "layer_group": g} for g in range(n_groups)
    ]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def closed_form_sgdr(t: int, t0: int, mult: int, n_cycles: int, lr_max: float, lr_min: float):
    """SGDR eq. (5): T_cur and T_i from the geometric series of cycle lengths."""
    if mult == 1:
        i = t // t0
        t_cur, t_i = t - i * t0, t0
    else:  # cycle i starts at t0 (mult^i - 1) / (mult - 1)
        i = 0
        while t0 * (mult ** (i + 1) - 1) // (mult - 1) <= t:
            i += 1
        t_cur, t_i = t - t0 * (mult**i - 1) // (mult - 1), t0 * mult**i
    if i >= n_cycles:
        return lr_min
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * t_cur / t_i))


def run(schedule, base_lrs, optimizer):
    applied = []
    for step in range(schedule.total_steps):
        set_lrs(optimizer, base_lrs, schedule(step))
        applied.append([g["lr"] for g in optimizer.param_groups])
        optimizer.step()
    return applied


@pytest.mark.parametrize(
    ("n_cycles", "cycle_len", "cycle_mult", "min_lr_ratio"),
    [(3, 1, 2, 0.0), (2, 2, 1, 0.0), (4, 1, 3, 0.05), (1, 3, 2, 0.1)],
)
def test_sgdr_every_step_matches_closed_form(n_cycles, cycle_len, cycle_mult, min_lr_ratio):
    spe, lr = 7, 0.03
    schedule = create_schedule(
        "sgdr",
        steps_per_epoch=spe,
        n_cycles=n_cycles,
        cycle_len=cycle_len,
        cycle_mult=cycle_mult,
        min_lr_ratio=min_lr_ratio,
    )
    epochs = sum(cycle_len * cycle_mult**i for i in range(n_cycles))
    assert schedule.total_steps == epochs * spe
    base = group_lrs(lr, RATIOS)
    applied = run(schedule, base, tiny_optimizer())
    for step, lrs in enumerate(applied):
        for g, ratio in enumerate(RATIOS):
            top = lr * ratio
            expected = closed_form_sgdr(
                step, cycle_len * spe, cycle_mult, n_cycles, top, top * min_lr_ratio
            )
            assert lrs[g] == pytest.approx(expected, rel=1e-12, abs=1e-15), (step, g)


def test_sgdr_restarts_and_cycle_lengths_multiply():
    schedule = create_schedule("sgdr", steps_per_epoch=10, n_cycles=3, cycle_len=1, cycle_mult=2)
    assert schedule.cycle_steps == (10, 20, 40)
    assert schedule.restarts == (0, 10, 30)
    assert (
        schedule.epochs
        == default_section(FinetuneParams, n_cycles=3, cycle_len=1, cycle_mult=2).epochs
        == 7
    )
    factors = [schedule(s) for s in range(schedule.total_steps)]
    jumps = [s for s in range(1, len(factors)) if factors[s] > factors[s - 1]]
    assert jumps == [10, 30]
    assert all(factors[s] == 1.0 for s in schedule.restarts)
    # within a cycle the LR only decreases
    for start, length in zip(schedule.restarts, schedule.cycle_steps, strict=True):
        cycle = factors[start : start + length]
        assert all(a > b for a, b in itertools.pairwise(cycle))


def test_group_ratios_constant_at_every_step():
    schedule = create_schedule(
        "sgdr", steps_per_epoch=5, n_cycles=3, cycle_len=1, cycle_mult=2, warmup_pct=0.2
    )
    applied = run(schedule, group_lrs(0.01, RATIOS), tiny_optimizer())
    for lrs in applied:
        assert lrs[0] / lrs[2] == pytest.approx(0.01, rel=1e-12)
        assert lrs[1] / lrs[2] == pytest.approx(0.1, rel=1e-12)


def test_course_warmup_runs_at_lr_over_100_then_joins_the_cosine():
    schedule = create_schedule(
        "sgdr", steps_per_epoch=40, n_cycles=2, cycle_len=1, cycle_mult=2, warmup_pct=0.05
    )
    assert schedule.warmup_steps == 2
    assert schedule(0) == schedule(1) == 0.01
    assert schedule(2) == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 40)))
    assert schedule(40) == 1.0  # the second cycle has no warm-up


def test_sgdr_matches_timm_cosine_scheduler_stepped_per_iteration():
    """timm reproduces our SGDR when told to (defaults differ: cycle_limit=1, t_in_epochs)."""
    spe, lr = 6, 0.1
    ours = create_schedule(
        "sgdr", steps_per_epoch=spe, n_cycles=3, cycle_len=1, cycle_mult=2, min_lr_ratio=0.1
    )
    base = group_lrs(lr, RATIOS)
    ours_lrs = run(ours, base, tiny_optimizer())
    opt = tiny_optimizer()
    for group, b in zip(opt.param_groups, base, strict=True):
        group["lr"] = b
    timm_sched = CosineLRScheduler(
        opt,
        t_initial=spe,
        lr_min=lr * 0.1 * 0.01,  # timm has one lr_min for all groups: compare group 0 only
        cycle_mul=2,
        cycle_decay=1.0,
        cycle_limit=3,
        t_in_epochs=False,
    )
    for step in range(ours.total_steps):
        timm_sched.step_update(step)
        assert opt.param_groups[0]["lr"] == pytest.approx(ours_lrs[step][0], rel=1e-9), step
        opt.step()


def test_one_cycle_matches_torch_one_cycle_lr():
    spe, lr = 8, 0.02  # peak at step 0.25 * 16 - 1 = 3
    schedule = create_schedule("one_cycle", steps_per_epoch=spe, n_cycles=2, cycle_len=1)
    base = group_lrs(lr, RATIOS)
    ours = run(schedule, base, tiny_optimizer())
    opt = tiny_optimizer()
    torch_sched = torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=base,
        total_steps=schedule.total_steps,
        pct_start=0.25,
        anneal_strategy="cos",
        cycle_momentum=False,
        three_phase=False,
    )
    for step in range(schedule.total_steps):
        got = [g["lr"] for g in opt.param_groups]
        assert got == pytest.approx(ours[step], rel=1e-9), step
        opt.step()
        torch_sched.step()
    assert max(ours, key=lambda lrs: lrs[2])[2] == pytest.approx(lr)


def test_invalid_geometry_is_rejected():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        create_schedule("sgdr", steps_per_epoch=0)
    with pytest.raises(ValueError, match="unknown schedule"):
        create_schedule("linear", steps_per_epoch=3)  # type: ignore[arg-type]
