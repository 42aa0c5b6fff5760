"""LR finder: suggestion methods on known curves, exact restore, a sane LR on a small problem."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from real_config import default_section

from visiontune.config import HeadParams, LrFindParams
from visiontune.train.head import feature_batches, train_head
from visiontune.train.lr_find import (
    exponential_lrs,
    find_lr,
    lr_range_test,
    slide_index,
    suggest_lrs,
    valley_index,
)

# The sweep's smoothing and stop rule as params.yaml ships them.
_LR_FIND = default_section(LrFindParams)
SWEEP = {"smooth": _LR_FIND.smooth, "diverge": _LR_FIND.diverge}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Small tensors: one thread is faster, and far faster when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def blobs(n: int = 256, dim: int = 32, classes: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 1.5
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def test_exponential_lrs_span_the_range():
    lrs = exponential_lrs(1e-7, 10.0, 100)
    assert lrs[0] == pytest.approx(1e-7) and lrs[-1] == pytest.approx(10.0)
    ratios = lrs[1:] / lrs[:-1]
    assert np.allclose(ratios, ratios[0])


def test_suggestions_on_a_known_curve():
    lrs = exponential_lrs(1e-6, 10.0, 200)
    x = np.log10(lrs)
    # flat, then a descent centred at 1e-3 down to a minimum near 1e-1, then divergence
    loss = 2.0 - 1.5 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1, (x + 1) ** 2 * 8, 0)
    s = suggest_lrs(lrs, loss)
    assert s["min/10"] == pytest.approx(lrs[np.argmin(loss)] / 10)
    assert 10**-3.2 < s["steepest"] < 10**-2.8  # the inflection point of the descent
    assert 1e-4 < s["valley"] < 1e-1
    # slide anchors on the take-off: past the steep descent, short of the minimum
    assert s["steepest"] < s["slide"] < lrs[np.argmin(loss)]
    # fastai's arithmetic, kept exactly: start = end - length = -1, sections = 5 / 3
    assert valley_index([5, 4, 3, 2, 1, 2, 3]) == -1 + 1 + 0
    assert valley_index([9, 9, 9, 8, 7, 6, 5, 4, 3, 2, 1, 5]) == 1 + 3 + 1


def test_slide_walks_back_from_the_take_off_by_its_window():
    # gradients 0 … 0, .5, 1.5, 3, 6, 8: the window's ends agree once its left end is 2
    # points into the flat part, 3 before the first rising point
    assert slide_index([1, 1, 1, 1, 1, 1, 2, 4, 8, 16], lr_diff=3) == 2
    assert slide_index([1.0, 1.0, 1.0]) == 0  # a window wider than the curve shrinks
    assert slide_index([1.0, 1.1, 1.3, 1.6, 2.0], lr_diff=2, thresh=1.0) == 2


def test_slide_is_stable_on_a_flat_curve_that_diverges():
    """After a trained head the loss is flat (batch noise only) until the LR nears the
    take-off, here 3e-2: slide stays two decades below it on every noise draw, where the
    longest-descent rule (`valley`) lands anywhere between 4e-5 and 6e-3."""
    found = []
    for seed in range(8):
        rng = np.random.default_rng(seed)

        def step(lr: float, rng=rng) -> float:
            return 0.6 + rng.normal(0, 0.08) + 3 * max(0.0, math.log10(lr / 3e-2))

        result = lr_range_test(step, start_lr=1e-7, end_lr=10, num_iter=60, **SWEEP)
        found.append(result.suggestion("slide"))
    assert min(found) > 1e-4 and max(found) < 1e-3
    assert max(found) / min(found) < 3


def test_range_test_stops_when_loss_diverges():
    result = lr_range_test(
        lambda lr: 1.0 if lr < 1e-2 else 1.0 + 1e4 * lr,
        start_lr=1e-5,
        end_lr=10,
        num_iter=100,
        **SWEEP,
    )
    assert result.stopped_early
    assert len(result.curve) < 100
    assert list(result.curve.columns) == ["step", "lr", "loss", "smoothed_loss"]
    # debiased EMA: the first smoothed value is the first loss itself
    assert result.curve["smoothed_loss"].iloc[0] == pytest.approx(1.0)


def _model_and_optimizer():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.BatchNorm1d(32), torch.nn.Dropout(0.2), torch.nn.Linear(32, 4)
    )
    groups = [
        {"params": model[0].parameters(), "layer_group": 0},
        {"params": model[2].parameters(), "layer_group": 1},
    ]
    opt = torch.optim.SGD(groups, lr=0.05, momentum=0.9, weight_decay=1e-4)
    return model, opt


def _step_fn(model, opt):
    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss

    return step


def test_find_lr_restores_weights_optimizer_and_rng_exactly():
    model, opt = _model_and_optimizer()
    x, y = blobs()
    step = _step_fn(model, opt)
    step(x[:64], y[:64])  # a momentum buffer and BN running stats that must survive
    before_model = {k: v.clone() for k, v in model.state_dict().items()}
    before_opt = opt.state_dict()
    before_momentum = [opt.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    rng = torch.get_rng_state()
    batches = feature_batches(x, y, 32, torch.Generator().manual_seed(1))
    result = find_lr(
        model, opt, batches, step, [0.1, 1.0], start_lr=1e-5, end_lr=10, num_iter=40, **SWEEP
    )
    assert len(result.curve) > 5
    for key, value in model.state_dict().items():
        assert torch.equal(value, before_model[key]), key
    for p, m in zip(model.parameters(), before_momentum, strict=True):
        assert torch.equal(opt.state[p]["momentum_buffer"], m)
    assert [g["lr"] for g in opt.param_groups] == [g["lr"] for g in before_opt["param_groups"]]
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.training


def test_find_lr_keeps_group_ratios_during_the_sweep():
    model, opt = _model_and_optimizer()
    seen = []

    def step(x, y):
        seen.append([g["lr"] for g in opt.param_groups])
        return _step_fn(model, opt)(x, y)

    x, y = blobs()
    batches = feature_batches(x, y, 32, torch.Generator().manual_seed(1))
    find_lr(model, opt, batches, step, [0.1, 1.0], start_lr=1e-4, end_lr=1.0, num_iter=10, **SWEEP)
    assert seen[0] == pytest.approx([1e-5, 1e-4])
    assert all(lo / hi == pytest.approx(0.1) for lo, hi in seen)


def test_suggested_lr_trains_a_small_problem_well():
    """The valley LR trains a 4-class problem better than 100× less, before the loss minimum."""
    x, y = blobs(512)
    vx, vy = blobs(256, seed=0)  # same centres, fresh noise would need the same generator
    params = default_section(
        HeadParams, epochs=2, batch_size=32, lr="auto", optimizer="sgd", weight_decay=0.01
    )
    result = train_head(x, y, vx, vy, 4, params, seed=42)
    lr = result.metrics["lr"]
    assert result.lr_find is not None and lr == result.lr_find.suggestion("valley")
    assert 1e-4 < lr < 10
    losses = {}
    for scale in (0.01, 1.0):
        scaled = params.model_copy(update={"lr": lr * scale})
        run = train_head(x, y, vx, vy, 4, scaled, seed=42)
        losses[scale] = run.metrics["train_loss"]
    assert losses[1.0] < losses[0.01]
    curve = result.lr_find.curve
    assert lr <= curve["lr"][curve["smoothed_loss"].idxmin()]
    assert math.isfinite(losses[1.0])


def test_noise_on_a_near_zero_loss_is_not_divergence():
    """After a trained head the loss is noise near 0: the first batch or two can be 20× lower."""
    noise = [0.001, 0.002, 0.05, 0.01, 0.03, 0.04, 0.02, 0.05, 0.03, 0.02]
    losses = iter(noise + [0.03] * 40 + [5.0] * 50)
    result = lr_range_test(
        lambda lr: next(losses), start_lr=1e-6, end_lr=1.0, num_iter=100, **SWEEP
    )
    assert result.stopped_early
    assert len(result.curve) > 45  # stopped by the real rise, not by the early blip


# The smoothed lr_find curve after a logistic head on digits (far from ImageNet): noise on
# a flat loss, then the rise. 60 iterations from 1e-7 to 10, stopped at 53.
DIGITS_CURVE = [
    0.6523, 0.5087, 0.5158, 0.5447, 0.5577, 0.5119, 0.5834, 0.5575, 0.6086, 0.6063, 0.5702,
    0.5866, 0.5707, 0.6296, 0.6614, 0.6885, 0.6669, 0.6587, 0.7769, 0.7465, 0.7254, 0.7310,
    0.7150, 0.7330, 0.7484, 0.7636, 0.7861, 0.7897, 0.7869, 0.8056, 0.8312, 0.8785, 0.9077,
    1.0068, 1.0434, 1.0767, 1.1380, 1.1934, 1.2448, 1.2932, 1.3302, 1.3751, 1.4211, 1.4626,
    1.4934, 1.5209, 1.5782, 1.6096, 1.7219, 1.7774, 1.8816, 2.0764, 2.2942,
]  # fmt: skip


def test_slide_falls_back_to_the_takeoff_on_a_noisy_plateau():
    """The slide walk finds no agreeing window on this curve and used to return the smallest
    LR tried (4.8e-7: a fine-tune that changed nothing); the take-off rule gives a thirtieth of
    the last LR before the loss leaves its plateau for good."""
    lrs = 1e-7 * (10 / 1e-7) ** (np.arange(53) / 59)
    found = suggest_lrs(lrs, DIGITS_CURVE)
    assert found["slide"] == found["takeoff/30"]
    assert 3e-5 < found["slide"] < 2e-4
    assert slide_index(DIGITS_CURVE[5:48]) is None
