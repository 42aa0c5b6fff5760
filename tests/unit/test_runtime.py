"""Runtime resolution: device, precision, memory format, workers and seeding."""

from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from real_config import default_runtime, default_section

import visiontune.runtime as runtime_module
from visiontune.config import RuntimeParams
from visiontune.data.dataset import create_loader
from visiontune.runtime import (
    autocast,
    configure_memory,
    cpu_count,
    cpu_supports_bf16,
    is_glibc,
    prepare_module,
    seed_everything,
    thp_available,
    to_device,
)


def test_forced_fp32_has_no_autocast() -> None:
    runtime = default_runtime(device="cpu", precision="fp32", num_workers=0)
    assert runtime.amp_dtype is None
    assert runtime.precision == "fp32"
    assert runtime.channels_last  # oneDNN's fast CPU kernels want it in fp32 too
    assert not runtime.pin_memory
    with autocast(runtime):
        out = torch.nn.Linear(4, 2)(torch.ones(1, 4))
    assert out.dtype == torch.float32


def test_forced_bf16_autocasts_and_uses_channels_last() -> None:
    runtime = default_runtime(device="cpu", precision="bf16", num_workers=1)
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
    runtime = default_runtime(device="auto", precision="auto")
    assert runtime.device.type == "cpu"
    expected = torch.bfloat16 if cpu_supports_bf16() else None
    assert runtime.amp_dtype is expected
    assert runtime.num_workers == min(cpu_count(), 8)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="no CUDA device"):
        default_runtime(device="cuda")


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
    runtime = default_runtime(device="cpu", num_workers=2, worker_priority=priority)
    loader = create_loader(_SchedulerOfWorker(), 1, runtime, shuffle=False, seed=0)
    seen = {int(batch[0]) for batch, _, _ in loader}
    assert seen == {getattr(os, policy)}
    assert os.sched_getscheduler(0) == os.SCHED_OTHER  # the main process keeps its own


def test_worker_priority_auto_is_idle_on_cpu() -> None:
    assert default_runtime(device="cpu").idle_workers
    assert not default_runtime(device="cpu", worker_priority="normal").idle_workers


def test_huge_pages_follow_the_param_and_leave_a_users_setting_alone() -> None:
    def huge_pages(setting: bool | str, env: dict[str, str]) -> bool:
        settings = default_section(RuntimeParams, huge_pages=setting, keep_freed_memory=False)
        return configure_memory(settings, env).huge_pages

    env: dict[str, str] = {}
    assert huge_pages(True, env) and env == {"THP_MEM_ALLOC_ENABLE": "1"}
    env = {}
    assert not huge_pages(False, env) and env == {}
    assert not huge_pages(True, {"THP_MEM_ALLOC_ENABLE": "0"})
    assert huge_pages("auto", {}) == thp_available()


def test_keep_freed_memory_auto_leaves_a_users_malloc_settings_alone() -> None:
    settings = default_section(RuntimeParams, huge_pages=False, keep_freed_memory="auto")
    assert not configure_memory(settings, {"MALLOC_TRIM_THRESHOLD_": "0"}).keep_freed_memory
    assert not configure_memory(
        settings.model_copy(update={"keep_freed_memory": False}), {}
    ).keep_freed_memory


@pytest.mark.skipif(not is_glibc(), reason="the allocator setting is glibc's")
def test_kept_memory_is_released_before_workers_fork() -> None:
    """Kept memory stays resident until `release_freed_memory`, which `create_loader`
    calls before its workers fork (they would share those pages copy-on-write)."""
    import subprocess
    import sys

    script = (
        "import torch\n"
        "from visiontune.config import BaseParams, RuntimeParams\n"
        "from visiontune.data.dataset import create_loader\n"
        "from visiontune.runtime import configure_memory, resolve_runtime\n"
        "settings = RuntimeParams(num_workers=0, worker_priority='auto', huge_pages=False,"
        " keep_freed_memory=True)\n"
        "configure_memory(settings)\n"
        "def rss(): return int(open('/proc/self/statm').read().split()[1]) * 4096 >> 20\n"
        "x = torch.ones(16 * 2**20); start = rss(); del x\n"
        "kept = rss()\n"
        "base = BaseParams(seed=0, device='cpu', precision='fp32', deterministic=False)\n"
        "runtime = resolve_runtime(base, settings.model_copy(update={'num_workers': 1}))\n"
        "create_loader(list(range(4)), 2, runtime, shuffle=False, seed=0)\n"
        "print(start, kept, rss())\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "THP_"))}
    run = [sys.executable, "-c", script]
    out = subprocess.run(run, capture_output=True, text=True, check=True, env=env).stdout
    start, kept, released = map(int, out.split())
    assert kept > start - 8  # freed but resident
    assert released < kept - 48  # the 64 MiB went back before the workers could fork


@pytest.mark.skipif(not is_glibc(), reason="the allocator setting is glibc's")
@pytest.mark.parametrize("keep,thread", [(True, False), (False, False), (True, True)])
def test_kept_memory_serves_the_next_batch_without_page_faults(keep: bool, thread: bool) -> None:
    """In a fresh process: after a 64 MiB tensor is freed, a 32 MiB one faults its 8192
    pages in afresh unless freed memory is kept (a forward pass's activations, batch
    after batch), also in a thread of its own (a served model's request thread)."""
    import subprocess
    import sys

    script = (
        "import resource, sys, threading, torch\n"
        "from visiontune.config import RuntimeParams\n"
        "from visiontune.runtime import configure_memory\n"
        "keep = sys.argv[1] == 'on'\n"
        "settings = configure_memory(RuntimeParams(num_workers=0, worker_priority='auto',"
        " huge_pages=False, keep_freed_memory=keep))\n"
        "assert settings.keep_freed_memory == keep, settings\n"
        "def batches():\n"
        "    x = torch.ones(16 * 2**20); del x\n"
        "    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt\n"
        "    x = torch.ones(8 * 2**20)\n"
        "    print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)\n"
        "if sys.argv[2] == 'thread':\n"
        "    t = threading.Thread(target=batches); t.start(); t.join()\n"
        "else:\n"
        "    batches()\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("THP_MEM_ALLOC_ENABLE", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
    }
    run = [sys.executable, "-c", script, "on" if keep else "off", "thread" if thread else "main"]
    faults = int(subprocess.run(run, capture_output=True, text=True, check=True, env=env).stdout)
    if keep:
        assert faults < 1000
    else:
        assert faults > 6000  # 32 MiB in 4 KiB pages is 8192


@pytest.mark.skipif(not thp_available(), reason="the kernel offers no transparent huge pages")
def test_configured_memory_puts_large_tensors_on_huge_pages(tmp_path) -> None:
    """In a fresh process (torch reads the setting once): a 64 MiB tensor lands on huge pages
    after configure_memory, and on none without it."""
    import subprocess
    import sys

    script = (
        "import re, sys, torch\n"
        "from visiontune.config import RuntimeParams\n"
        "from visiontune.runtime import configure_memory\n"
        "configure_memory(RuntimeParams(num_workers=0, worker_priority='auto',"
        " huge_pages=sys.argv[1] == 'on', keep_freed_memory='auto'))\n"
        "x = torch.ones(16 * 2**20)\n"
        "text = open('/proc/self/smaps_rollup').read()\n"
        "print(int(re.search(r'AnonHugePages:\\s+(\\d+)', text).group(1)))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}

    def anon_huge_kib(mode: str) -> int:
        run = [sys.executable, "-c", script, mode]
        return int(subprocess.run(run, capture_output=True, text=True, check=True, env=env).stdout)

    kib = {mode: anon_huge_kib(mode) for mode in ("on", "off")}
    assert kib["on"] >= 32 * 1024 and kib["off"] < kib["on"]


def test_loader_wait_counts_the_waits_for_batches_and_not_the_work_on_them(monkeypatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(runtime_module.time, "perf_counter", lambda: clock[0])

    def loader():
        clock[0] += 2.0  # worker start-up and the first batch
        yield "a"
        clock[0] += 0.5
        yield "b"
        clock[0] += 0.25  # the loader notices it is done

    wait, seen = runtime_module.LoaderWait(), []
    for batch in wait.batches(loader()):
        clock[0] += 10.0  # the model's work on the batch: not a wait
        seen.append(batch)
    assert seen == ["a", "b"] and wait.seconds == 2.75
    # A loop that stops early (the fine-tune's steps) counts only the waits it had.
    early = runtime_module.LoaderWait()
    batches = early.batches(loader())
    next(batches)
    assert early.seconds == 2.0


def test_peak_gpu_memory_is_none_off_cuda() -> None:
    assert runtime_module.peak_gpu_mib(default_runtime(device="cpu")) is None
