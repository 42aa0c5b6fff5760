"""Batched forward passes over a loader: eval mode, mixed precision, channels_last, progress."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from visiontune.runtime import Runtime, autocast, prepare_module, to_device


def run_inference(
    module: torch.nn.Module, loader: DataLoader, runtime: Runtime, desc: str = ""
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run `module` over every batch of `loader`.

    The module is moved to the runtime's device and memory format (in place) and put in
    eval mode. Batches are `(images, labels, indices)` as ImageDataset yields them;
    outputs come back in dataset order even from a shuffled loader.

    Returns:
        (outputs as float32 N×D on the CPU, labels N (int64), images per second).
    """
    module = prepare_module(module, runtime).eval()
    size = len(loader.dataset)  # type: ignore[arg-type]
    outputs: torch.Tensor | None = None
    labels = torch.full((size,), -1, dtype=torch.int64)
    seen = torch.zeros(size, dtype=torch.bool)
    start = time.perf_counter()
    # no_grad, not inference_mode: callers train heads on these outputs afterwards.
    with torch.no_grad(), tqdm(total=size, desc=desc, unit="img", mininterval=1.0) as bar:
        for images, targets, indices in loader:
            with autocast(runtime):
                batch = module(to_device(images, runtime))
            batch = batch.float().cpu()
            if outputs is None:
                outputs = torch.empty((size, *batch.shape[1:]), dtype=torch.float32)
            outputs[indices] = batch
            labels[indices] = torch.as_tensor(targets, dtype=torch.int64)
            seen[indices] = True
            bar.update(len(indices))
    elapsed = time.perf_counter() - start
    if not bool(seen.all()):
        raise RuntimeError(f"{desc or 'inference'}: the loader skipped {int((~seen).sum())} items")
    if outputs is None:
        raise ValueError(f"{desc or 'inference'}: the loader is empty")
    return outputs, labels, size / elapsed if elapsed > 0 else float("inf")


def benchmark_forward(
    module: torch.nn.Module,
    runtime: Runtime,
    batch_size: int,
    image_size: int,
    batches: int = 3,
    warmup: int = 1,
) -> float:
    """Model-only forward images/s on random tensors: the ceiling a data pipeline can reach."""
    module = prepare_module(module, runtime).eval()
    images = to_device(torch.randn(batch_size, 3, image_size, image_size), runtime)
    with torch.no_grad(), autocast(runtime):
        for _ in range(warmup):
            module(images)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
        start = time.perf_counter()
        for _ in range(batches):
            module(images)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize(runtime.device)
    return batches * batch_size / (time.perf_counter() - start)
