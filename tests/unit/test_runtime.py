"""Runtime resolution: device, precision, memory format, workers and seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch

from visiontune.config import BaseParams
from visiontune.data.dataset import create_loader
from visiontune.runtime import (
    autocast,
    cpu_count,
    cpu_supports_bf16,
    prepare_module,
    resolve_runtime,
    seed_everything,
    to_device,
)


def test_forced_fp32_has_no_autocast() -> None:
    runtime = resolve_runtime(BaseParams(device="cpu", precision="fp32", num_workers=0))
    assert runtime.amp_dtype is None
    assert runtime.precision == "fp32"
    assert runtime.channels_last  # oneDNN's fast CPU kernels want it in fp32 too
    assert not runtime.pin_memory
    with autocast(runtime):
        out = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert out.dtype == torch.float32


def test_forced_bf16_autocasts_and_uses_channels_last() -> None:
    runtime = resolve_runtime(BaseParams(device="cpu", precision="bf16", num_workers=1))
    assert runtime.amp_dtype is torch.bfloat16
    assert runtime.precision == "bf16"
    assert runtime.channels_last
    assert runtime.num_workers == 1
    with autocast(runtime):
        out = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert out.dtype == torch.bfloat16
    conv = prepare_module(torch.nn.Conv2d(3, 4, 3), runtime)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    batch = to_device(torch.zeros(2, 3, 8, 8), runtime)
    assert batch.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU choice")
def test_auto_follows_the_cpu_bf16_capability() -> None:
    runtime = resolve_runtime(BaseParams(device="auto", precision="auto"))
    assert runtime.device.type == "cpu"
    expected = torch.bfloat16 if cpu_supports_bf16() else None
    assert runtime.amp_dtype is expected
    assert runtime.num_workers == min(cpu_count(), 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        resolve_runtime(BaseParams(device="cuda"))


def test_seed_everything_repeats_every_generator() -> None:
    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    seed_everything(7)
    first = draw()
    seed_everything(7)
    assert draw() == first
    seed_everything(8)
    assert draw() != first


class _SchedulerOfWorker(torch.utils.data.Dataset):
    """Each item is the scheduling policy of the process that produced it."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        return torch.tensor(os.sched_getscheduler(0)), 0, index


@pytest.mark.skipif(not hasattr(os, "SCHED_IDLE"), reason="SCHED_IDLE is Linux-only")
@pytest.mark.parametrize(
    ("priority", "policy"), [("idle", "SCHED_IDLE"), ("normal", "SCHED_OTHER")]
)
def test_loader_workers_run_at_the_asked_priority(priority: str, policy: str) -> None:
    runtime = resolve_runtime(BaseParams(device="cpu", num_workers=2, worker_priority=priority))
    loader = create_loader(_SchedulerOfWorker(), 1, runtime, shuffle=False, seed=0)
    seen = {int(batch[0]) for batch, _, _ in loader}
    assert seen == {getattr(os, policy)}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the main process keeps its own


def test_worker_priority_auto_is_idle_on_cpu_only() -> None:
    assert resolve_runtime(BaseParams(device="cpu")).idle_workers
    assert not resolve_runtime(BaseParams(device="cpu", worker_priority="normal")).idle_workers
