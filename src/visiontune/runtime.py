"""Where and how tensors run: device, mixed precision, memory format, CPU allocator, loader
workers, seeds; `resolve_runtime` makes the params one frozen `Runtime` for every stage."""

from __future__ import annotations

import ctypes
import os
import platform
import random
import sys
import time
from collections.abc import Iterable, Iterator, MutableMapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import torch

from visiontune.cores import cpu_count, loader_workers

if TYPE_CHECKING:  # a served model ships this module without the params code
    from visiontune.config import BaseParams, RuntimeParams

__all__ = ["cpu_count", "loader_workers"]  # re-exported: the serving code imports them here

Batch = TypeVar("Batch")
_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
_PRECISIONS = {dtype: name for name, dtype in _DTYPES.items()}


@dataclass(frozen=True)
class Runtime:
    """The resolved execution settings shared by every stage."""

    device: torch.device
    amp_dtype: torch.dtype | None
    channels_last: bool
    num_workers: int
    pin_memory: bool
    idle_workers: bool = False

    @property
    def precision(self) -> str:
        """`fp32`, `bf16` or `fp16`: the compute precision actually used."""
        return _PRECISIONS[self.amp_dtype]


@cache
def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 (AVX-512 BF16 or AMX); else bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:  # no /proc (macOS, Windows): oneDNN's own check is the next best signal
        is_supported = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
        return bool(is_supported and is_supported())
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_runtime(base: BaseParams, settings: RuntimeParams) -> Runtime:
    """The `Runtime` of the `base` (device, precision) and `runtime` (workers) params."""
    return create_runtime(
        device=base.device,
        precision=base.precision,
        num_workers=settings.num_workers,
        worker_priority=settings.worker_priority,
    )


def resolve_precision(base: BaseParams) -> str:
    """What the `base` params compute in on this machine (a feature cache records it)."""
    return _PRECISIONS[_resolve_amp_dtype(base.precision, _resolve_device(base.device))]


def create_runtime(
    *, device: str, precision: str, num_workers: int | str = 0, worker_priority: str = "auto"
) -> Runtime:
    """Device (`auto`: CUDA when available), precision (`auto`: bf16, else fp16, on CUDA;
    bf16 on CPUs with native bf16, else fp32), memory format and loader workers. channels_last
    suits oneDNN's convolutions in any precision (Lite0 fp32 forward ~1.6x faster) and
    cuDNN's tensor cores under AMP."""
    torch_device = _resolve_device(device)
    use_cuda = torch_device.type == "cuda"
    amp_dtype = _resolve_amp_dtype(precision, torch_device)
    # On a CPU a worker that preempts one OpenMP thread stalls the model's parallel region;
    # at idle priority workers fill only the gaps (2 cores, dogscats: precompute 87 -> 99
    # and 104 -> 110 images/s, lr_find 6-12 % faster). On CUDA they need the free cores.
    idle = worker_priority == "idle" or (worker_priority == "auto" and not use_cuda)
    return Runtime(
        device=torch_device,
        amp_dtype=amp_dtype,
        channels_last=not use_cuda or amp_dtype is not None,
        num_workers=loader_workers(num_workers),
        pin_memory=use_cuda,
        idle_workers=idle,
    )


def _resolve_device(device: str) -> torch.device:
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("base.device is 'cuda' but no CUDA device is available; use auto or cpu")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_cuda else "cpu")


def _resolve_amp_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    if precision == "auto":
        if device.type == "cuda":
            precision = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            precision = "bf16" if cpu_supports_bf16() else "fp32"
    return _DTYPES[precision]


# PyTorch's CPU allocator madvises allocations of 2 MiB and more as huge pages when this
# variable is 1; it reads it once, at the first such allocation.
_THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"
# glibc's own allocator settings: a user who set any of them keeps them (`auto`).
_MALLOC_VARIABLES = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters (malloc.h)


@dataclass(frozen=True)
class AutoMemory:
    """`runtime.huge_pages` and `runtime.keep_freed_memory` for what runs without params
    (`visiontune predict`, the served model): both `auto`."""

    huge_pages: str = "auto"
    keep_freed_memory: str = "auto"


@dataclass(frozen=True)
class MemorySettings:
    """What `configure_memory` turned on."""

    huge_pages: bool
    keep_freed_memory: bool


def configure_memory(
    settings: RuntimeParams | AutoMemory, environ: MutableMapping[str, str] = os.environ
) -> MemorySettings:
    """Set up the CPU allocator, before any model is built: `runtime.huge_pages` (`auto`:
    where the kernel offers them; the environment's value wins) and `keep_freed_memory`
    (`auto`: with glibc, unless the user tuned it). Each forward allocates its activations
    afresh: in 4 KiB pages a Lite0 batch of 64 took ~350 000 page faults, over half of the
    forward on 2 cores (huge pages: 110 -> 250 images/s, precompute 90-100 -> 141-156)."""
    wanted = settings.huge_pages if settings.huge_pages != "auto" else thp_available()
    if wanted:
        environ.setdefault(_THP_VARIABLE, "1")
    keep = settings.keep_freed_memory
    if keep == "auto":
        keep = is_glibc() and not any(name in environ for name in _MALLOC_VARIABLES)
    return MemorySettings(
        huge_pages=environ.get(_THP_VARIABLE) == "1",
        keep_freed_memory=bool(keep) and keep_freed_memory(),
    )


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc, whose allocator this module tunes."""
    return ctypes.CDLL(None) if is_glibc() else None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (forked workers inherit it); whether it took.
    glibc maps blocks above 32 MiB afresh, unmaps them when freed and trims its heap, so each
    batch's activations were faulted in again (~1.2 GB per Lite0 batch of 64). Kept, at the
    price of the peak working set: forward 136 -> 223 images/s on 2 cores, a train step
    +10-18 %. One arena: a request thread's own heap (64 MiB) cannot keep a batch (86-98 ->
    124-137 images/s)."""
    libc = _glibc()
    if libc is None:
        return False
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return (
        mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1  # INT_MAX: trim only past 2 GiB
        and mallopt(_M_ARENA_MAX, 1) == 1
    )


def thp_available() -> bool:
    """Whether the kernel lets a process ask for transparent huge pages (madvise or always)."""
    try:
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text(encoding="utf-8")
    except OSError:
        return False
    return "[never]" not in mode


def release_freed_memory() -> None:
    """Hand kept freed memory back (glibc's `malloc_trim`) before loader workers fork and
    share it copy-on-write: fine-tune steps with a fresh loader per epoch ran at 0.80-0.85 of
    steps on a fixed batch, 0.86-1.06 after trimming (2 cores, dogscats)."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)


def lower_to_idle_priority() -> None:
    """Run this process only on CPU time nothing else wants (SCHED_IDLE, else nice 19): for
    loader workers, which end with their loader (lowering needs no privileges)."""
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:  # macOS, Windows
        os.nice(19)


def autocast(runtime: Runtime) -> torch.autocast:
    """Mixed-precision context for the runtime (disabled in fp32)."""
    enabled = runtime.amp_dtype is not None
    return torch.autocast(runtime.device.type, dtype=runtime.amp_dtype, enabled=enabled)


def prepare_module(module: torch.nn.Module, runtime: Runtime) -> torch.nn.Module:
    """Move a module to the runtime's device and memory format (in place; returned)."""
    memory_format = torch.channels_last if runtime.channels_last else torch.contiguous_format
    return module.to(device=runtime.device, memory_format=memory_format)


def to_device(tensor: torch.Tensor, runtime: Runtime) -> torch.Tensor:
    """Copy a batch to the device (asynchronously from pinned memory), images channels_last."""
    tensor = tensor.to(runtime.device, non_blocking=runtime.pin_memory)
    if runtime.channels_last and tensor.ndim == 4:
        tensor = tensor.contiguous(memory_format=torch.channels_last)
    return tensor


class LoaderWait:
    """Seconds a loop spent blocked on its loader (worker start-up included): beside a stage's
    images/s, whether the model waited for decoding."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def batches(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        """`loader`'s batches, timing each wait for one."""
        start = time.perf_counter()
        for batch in loader:
            self.seconds += time.perf_counter() - start
            yield batch
            start = time.perf_counter()
        self.seconds += time.perf_counter() - start


def peak_gpu_mib(runtime: Runtime) -> float | None:
    """The most GPU memory this process has held in tensors so far (None off CUDA)."""
    if runtime.device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(runtime.device) / 2**20


def seed_everything(seed: int, deterministic: bool = False) -> None:
    """Seed Python, NumPy and torch (all devices); optionally force deterministic kernels."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs this workspace setting before its first call to be reproducible.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
