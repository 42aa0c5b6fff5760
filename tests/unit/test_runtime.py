"""Runtime resolution: device, precision, memory format, workers and seeding."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from visiontune.config import BaseParams
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
