"""Where and how tensors run: device, mixed precision, memory format, loader workers, seeds.

`resolve_runtime` turns the `base` and `runtime` params into one frozen `Runtime` that
every stage passes to the loaders, the inference loop and the training loop.
"""

from __future__ import annotations

import contextlib
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

Batch = TypeVar("Batch")

if TYPE_CHECKING:  # a served model ships this module without the params code
    from visiontune.config import BaseParams, RuntimeParams

__all__ = ["cpu_count", "loader_workers"]  # re-exported: the serving code imports them here

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


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
        return _precision_name(self.amp_dtype)


def _precision_name(amp_dtype: torch.dtype | None) -> str:
    names = {dtype: name for name, dtype in _DTYPES.items()}
    return "fp32" if amp_dtype is None else names[amp_dtype]


@cache
def cpu_supports_bf16() -> bool:
    """Whether the CPU has native bf16 arithmetic (AVX-512 BF16 or AMX).

    Without it, CPU bf16 autocast is emulated and slower than fp32.
    """
    try:
        flags = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        # No /proc (macOS, Windows): oneDNN's own check is the next best signal.
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
    """`fp32`, `bf16` or `fp16`: the precision the `base` params compute in on this machine
    (what a feature cache's fingerprint records; loader settings play no part in it)."""
    return _precision_name(_resolve_amp_dtype(base.precision, _resolve_device(base.device)))


def create_runtime(
    *, device: str, precision: str, num_workers: int | str, worker_priority: str
) -> Runtime:
    """Pick device, precision, memory format and loader workers.

    `auto` device is CUDA when available, else CPU. `auto` precision is bf16 (or fp16
    where bf16 is unsupported) AMP on CUDA, bf16 autocast on CPUs with native bf16,
    otherwise fp32. channels_last is what oneDNN's fast convolution kernels want, in any
    precision (Lite0 fp32 forward measured ~1.6x faster with it here), and cuDNN's
    tensor-core kernels under AMP.
    """
    torch_device = _resolve_device(device)
    use_cuda = torch_device.type == "cuda"
    amp_dtype = _resolve_amp_dtype(precision, torch_device)
    workers = loader_workers(num_workers)
    # On a CPU the workers share the cores with the model's OpenMP threads: a worker that
    # preempts one thread stalls the whole parallel region while the other waits at its
    # barrier, so decoding cost the model about twice its own CPU time. At idle priority
    # the workers fill only the gaps the model leaves (2 cores, dogscats, alternating runs:
    # precompute 87 -> 99 and 104 -> 110 images/s, lr_find 6-12 % faster). On CUDA the
    # model runs on the GPU and the workers need the cores the main thread leaves.
    idle = worker_priority == "idle" or (worker_priority == "auto" and not use_cuda)
    return Runtime(
        device=torch_device,
        amp_dtype=amp_dtype,
        channels_last=not use_cuda or amp_dtype is not None,
        num_workers=workers,
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
    return _DTYPES.get(precision)


# PyTorch's CPU allocator madvises allocations of 2 MiB and more as huge pages when this
# variable is 1; it reads it once, at the first such allocation.
_THP_VARIABLE = "THP_MEM_ALLOC_ENABLE"


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
    """Set up the CPU allocator for batch after batch of large tensors; call before building
    any model.

    A forward pass allocates its activations afresh. `runtime.huge_pages` puts tensors of
    2 MiB and more on transparent huge pages: with 4 KiB pages a Lite0 batch of 64 took
    ~350 000 page faults, which on a 2-core VM was more than half of the forward (110 ->
    250 images/s; precompute 90-100 -> 141-156). `auto` is on where the kernel has
    transparent huge pages (Linux); a value already in the environment wins.

    `runtime.keep_freed_memory` stops those faults altogether (see `keep_freed_memory`).
    """
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


# glibc's own allocator settings: a user who set any of them keeps them (`auto`).
_MALLOC_VARIABLES = (
    "MALLOC_MMAP_MAX_",
    "MALLOC_TRIM_THRESHOLD_",
    "MALLOC_ARENA_MAX",
    "GLIBC_TUNABLES",
)
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8  # mallopt parameters (malloc.h)
_INT_MAX = 2**31 - 1


def is_glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


@cache
def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (whose allocator calls this module uses)."""
    if not is_glibc():
        return None
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory in the process for reuse; returns whether it took.

    glibc serves every block above 32 MiB with a fresh mapping and unmaps it when freed,
    and trims freed memory off the top of its heap: so each batch's activations were
    faulted in, zeroed and handed back again, ~1.2 GB of huge pages per Lite0 batch of 64
    (`thp_fault_alloc` in /proc/vmstat). On a VM those faults also stall in the host now
    and then, and batches took 2-5x their median. With mmap off and trimming at 2 GiB
    the heap keeps what a batch freed for the next one (2 cores, alternating fresh
    processes: forward 136/130 -> 223/225 images/s, 35 000 -> 500 huge-page faults;
    the precompute loop 139 -> 183; a train step +10-18 %). The price: the process keeps its
    peak memory until it exits, which for a stage is the working set it needs anyway.
    Forked loader workers inherit the setting.

    Every thread allocates from that one heap (one arena): a thread of its own gets a
    separate heap of at most 64 MiB, which cannot keep a batch's activations, so a forward
    run from a request thread, as the served model's are, faulted its pages in afresh
    (batches of 32 from a worker thread: 86-98 -> 124-137 images/s).
    """
    libc = _glibc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return (
        mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, _INT_MAX) == 1
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
    """Hand the memory freed so far back to the system (glibc's `malloc_trim`), before
    forking loader workers.

    With `keep_freed_memory` the heap holds the last batches' freed activations. Forked
    workers share those pages copy-on-write, so every page either process wrote again
    was copied first: fine-tune steps with a fresh loader per epoch ran at 0.80-0.85 of
    the same steps on a fixed batch, and at 0.86-1.06 after trimming (2 cores, dogscats;
    0.75-1.02 without kept memory). Trimming costs the next batch one round of page
    faults, as every batch paid before.
    """
    malloc_trim = getattr(_glibc(), "malloc_trim", None)
    if malloc_trim is not None:
        malloc_trim(0)


def lower_to_idle_priority() -> None:
    """Run this process only on CPU time nothing else wants (SCHED_IDLE, else nice 19).

    Lowering a priority needs no privileges. Called in loader workers only: they end with
    their loader, and the main process keeps its own priority.
    """
    if hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    else:  # macOS, Windows
        os.nice(19)


def autocast(runtime: Runtime) -> contextlib.AbstractContextManager:
    """Mixed-precision context for the runtime (a no-op in fp32)."""
    if runtime.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=runtime.device.type, dtype=runtime.amp_dtype)


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
    """The seconds a loop spends blocked on its loader (worker start-up included): as a
    share of the loop, whether the model waited for decoding. A stage writes it beside
    its images/s, so a GPU run says where its time went without a profiler."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def batches(self, loader: Iterable[Batch]) -> Iterator[Batch]:
        """`loader`'s batches, timing each wait for one."""
        start = time.perf_counter()
        batches = iter(loader)
        for batch in batches:
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
