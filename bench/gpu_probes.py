"""What the GPU check measures beyond bench/limits.py: time blocked waiting for the loader,
peak GPU memory, JPEG decoding on the GPU against CPU workers, and a one-rank collective.

Measured from outside the library: a loader is wrapped where a library module creates it,
so the stages run their own code unchanged.
"""

from __future__ import annotations

import contextlib
import json
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

MIB = 2**20


@dataclass
class LoaderPass:
    """One pass over a loader: how long `iter()` took and each `next()` blocked."""

    iter_s: float  # worker start-up and the first prefetch requests
    started: float
    waits: list[float] = field(default_factory=list)
    ended: float | None = None  # when the loader ran out (None: the caller stopped early)

    def summary(self, seconds: float | None = None) -> dict[str, Any]:
        """The share of `seconds` (default: from `iter()` to the end of the pass) that the
        caller spent blocked in `next()`, with and without the first batch (which waits for
        the workers to start)."""
        if seconds is None:
            seconds = (self.ended or time.perf_counter()) - self.started
        total = sum(self.waits)
        first = self.waits[0] if self.waits else 0.0
        return {
            "batches": len(self.waits),
            "seconds": seconds,
            "wait_s": total,
            "wait_share": total / seconds if seconds > 0 else None,
            "first_batch_wait_s": first,
            "steady_wait_share": (total - first) / (seconds - first) if seconds > first else None,
            "iter_s": self.iter_s,
        }


class _TimedIterator:
    def __init__(self, inner: Iterator[Any], record: LoaderPass) -> None:
        self._inner, self._record = inner, record

    def __iter__(self) -> _TimedIterator:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            batch = next(self._inner)
        except StopIteration:
            self._record.ended = time.perf_counter()
            raise
        self._record.waits.append(time.perf_counter() - start)
        return batch


class TimedLoader:
    """A DataLoader whose passes are recorded in `passes`; everything else is the loader's."""

    def __init__(self, loader: Any, passes: list[LoaderPass]) -> None:
        self._loader, self._passes = loader, passes

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def __iter__(self) -> _TimedIterator:
        start = time.perf_counter()
        inner = iter(self._loader)  # eager, as the DataLoader's own: the caller's timing stays
        now = time.perf_counter()
        record = LoaderPass(iter_s=now - start, started=now)
        self._passes.append(record)
        return _TimedIterator(inner, record)


@contextlib.contextmanager
def timed_loaders(module: ModuleType) -> Iterator[list[LoaderPass]]:
    """Record every pass over the loaders `module.create_loader` makes inside the block."""
    original: Callable[..., Any] = module.create_loader
    passes: list[LoaderPass] = []

    def create_loader(*args: Any, **kwargs: Any) -> TimedLoader:
        return TimedLoader(original(*args, **kwargs), passes)

    module.create_loader = create_loader
    try:
        yield passes
    finally:
        module.create_loader = original


def wait_share(passes: Sequence[LoaderPass], seconds: Sequence[float] | None = None) -> dict:
    """Per pass and over all passes: the share of the time spent blocked on the loader.

    `seconds[i]` replaces pass i's own span (the fine-tune loop times its epochs itself).
    """
    spans = [None] * len(passes) if seconds is None else list(seconds)
    if len(spans) != len(passes):
        raise ValueError(f"{len(passes)} loader passes but {len(spans)} timings")
    rows = [p.summary(span) for p, span in zip(passes, spans, strict=True)]
    total_s = sum(r["seconds"] for r in rows)
    waited = sum(r["wait_s"] for r in rows)
    first = sum(r["first_batch_wait_s"] for r in rows)
    return {
        "wait_share": waited / total_s if total_s > 0 else None,
        "steady_wait_share": (waited - first) / (total_s - first) if total_s > first else None,
        "wait_s": waited,
        "seconds": total_s,
        "passes": rows,
    }


class GpuMemory:
    """Peak GPU memory between `reset()` and `read()` (None values off CUDA), and what was
    already allocated at `reset()` (the limits' models, kept for re-measuring)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.device = device
        self.at_start: float | None = None

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.at_start = torch.cuda.memory_allocated(self.device) / MIB

    def read(self) -> dict[str, float | None]:
        if not self.cuda:
            return {"peak_gpu_allocated_mib": None, "peak_gpu_reserved_mib": None}
        torch.cuda.synchronize(self.device)
        return {
            "peak_gpu_allocated_mib": torch.cuda.max_memory_allocated(self.device) / MIB,
            "peak_gpu_reserved_mib": torch.cuda.max_memory_reserved(self.device) / MIB,
            "gpu_allocated_at_start_mib": self.at_start,
        }


def _median_rate(run: Callable[[], int], repeats: int) -> dict[str, Any]:
    run()  # warm-up: page cache, nvJPEG handles, cuDNN/resize kernels
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        images = run()
        rates.append(images / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "runs": rates}


def tensor_decode(
    paths: Sequence[Path],
    device: torch.device,
    batch_size: int,
    resize: int | None = None,
    crop: int | None = None,
    interpolation: str = "bilinear",
    repeats: int = 3,
) -> dict[str, Any]:
    """Images/s of torchvision's `decode_jpeg` on `device` (nvJPEG on CUDA), `batch_size`
    files per call, from bytes already in memory; with `resize`/`crop`, also resized and
    centre-cropped there as the eval transform does. Reading the files is timed apart.
    """
    from torchvision.io import ImageReadMode, decode_jpeg
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as F

    start = time.perf_counter()
    data = [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]
    read_s = time.perf_counter() - start
    mode = InterpolationMode(interpolation)

    def one_pass() -> int:
        images = 0
        for i in range(0, len(data), batch_size):
            batch = decode_jpeg(data[i : i + batch_size], mode=ImageReadMode.RGB, device=device)
            if resize is not None:
                batch = [F.resize(x, [resize], interpolation=mode, antialias=True) for x in batch]
                batch = torch.stack([F.center_crop(x, [crop or resize] * 2) for x in batch])
            images += len(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return images

    return {
        "images": len(data),
        "batch_size": batch_size,
        "device": str(device),
        "read_images_per_s": len(data) / read_s if read_s > 0 else None,
        **_median_rate(one_pass, repeats),
    }


class DecodeOnly(torch.utils.data.Dataset):
    """Decodes a photo as the pipeline does (`open_pixels`) and keeps the pixels in the
    worker: the CPU's decoding alone, to set against nvJPEG's."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> int:
        from visiontune.data.pixels import open_pixels

        open_pixels(self.paths[index])
        return index


def loader_rate(
    dataset: torch.utils.data.Dataset, batch_size: int, runtime: Any, repeats: int = 3
) -> dict[str, Any]:
    """Images/s of the pipeline's loader (`create_loader`: the runtime's workers, pinned
    memory) over `dataset`, steady: the same loader pass after pass, its workers started
    and the files in the page cache by a first, untimed pass."""
    from visiontune.data.dataset import create_loader

    loader = create_loader(dataset, batch_size, runtime, shuffle=False, seed=0)

    def one_pass() -> int:
        return sum(len(b[0] if isinstance(b, list | tuple) else b) for b in loader)

    return {
        "images": len(dataset),  # type: ignore[arg-type]
        "batch_size": batch_size,
        "num_workers": runtime.num_workers,
        **_median_rate(one_pass, repeats),
    }


def jpeg_decoder() -> str:
    """What decodes the pipeline's JPEGs on the CPU here (visiontune.data.pixels)."""
    from visiontune.data import pixels

    return "torchcodec" if pixels.decode_jpeg is not None else "pillow"


_COLLECTIVE = """
import datetime, json, sys, tempfile, time
import torch, torch.distributed as dist
backend = sys.argv[1]
device = torch.device("cuda", 0) if backend == "nccl" else torch.device("cpu")
if device.type == "cuda":
    torch.cuda.set_device(device)
start = time.perf_counter()
with tempfile.TemporaryDirectory() as tmp:
    store = dist.FileStore(f"{tmp}/store", 1)
    timeout = datetime.timedelta(seconds=60)
    dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
    tensor = torch.arange(4, dtype=torch.float32, device=device)
    dist.all_reduce(tensor)
    dist.broadcast(tensor, 0)
    values = tensor.cpu().tolist()
    dist.destroy_process_group()
version = torch.cuda.nccl.version() if backend == "nccl" else None
version = ".".join(map(str, version)) if isinstance(version, tuple) else version
print(json.dumps({"ok": values == [0.0, 1.0, 2.0, 3.0], "values": values,
                  "nccl_version": version, "seconds": time.perf_counter() - start}))
"""


def collective_smoke(backend: str, timeout_s: float = 90.0) -> dict[str, Any]:
    """A one-rank process group of `backend` (nccl on CUDA) runs an all-reduce and a
    broadcast, in a child process so that a hang or crash costs at most `timeout_s`."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _COLLECTIVE, backend],
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        return {"backend": backend, "ok": False, "error": f"no answer within {timeout_s:.0f} s"}
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        error = f"exit {done.returncode}: {done.stderr.strip()[-2000:]}"
        return {"backend": backend, "ok": False, "error": error}
    return {"backend": backend, **json.loads(lines[-1])}


def slug(name: str) -> str:
    """`NVIDIA H200` → `nvidia-h200`: a device name as a file name."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def host_info(device: torch.device) -> dict[str, Any]:
    """Python, library and device versions of this machine."""
    from importlib.metadata import PackageNotFoundError, version

    def installed(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        **{name: installed(name) for name in ("torchvision", "timm", "pillow", "pydantic")},
        "torchcodec": installed("torchcodec"),
        "jpeg_decoder": jpeg_decoder(),
        "cuda_build": torch.version.cuda,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            device_name=torch.cuda.get_device_name(device),
            capability=".".join(map(str, torch.cuda.get_device_capability(device))),
            gpu_memory_mib=props.total_memory / MIB,
            gpu_count=torch.cuda.device_count(),
            cudnn=torch.backends.cudnn.version(),
            cudnn_benchmark=torch.backends.cudnn.benchmark,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info
