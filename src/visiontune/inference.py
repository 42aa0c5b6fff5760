"""Batched forward passes over a loader: eval mode, mixed precision, channels_last, progress."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, SequentialSampler
from tqdm.auto import tqdm

from visiontune.runtime import Runtime, autocast, prepare_module, to_device


def run_inference(
    module: torch.nn.Module, loader: DataLoader, runtime: Runtime, desc: str = ""
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run `module` over every batch of `loader`.

    The module is moved to the runtime's device and memory format (in place) and put in
    eval mode. Batches are `(images, labels, indices)` as ImageDataset yields them. The
    outputs keep the loader's order when it is sequential; a shuffled loader's outputs
    are put back in index order.

    Returns:
        (outputs as float32 N×D on the CPU, labels N (int64), images per second).
    """
    module = prepare_module(module, runtime).eval()
    size = len(loader.dataset)  # type: ignore[arg-type]
    outputs, labels, indices = [], [], []
    start = time.perf_counter()
    # no_grad, not inference_mode: callers train heads on these outputs afterwards.
    with torch.no_grad(), tqdm(total=size, desc=desc, unit="img", mininterval=1.0) as bar:
        for images, targets, index in loader:
            with autocast(runtime):
                batch = module(to_device(images, runtime))
            outputs.append(batch.float().cpu())
            labels.append(torch.as_tensor(targets, dtype=torch.int64))
            indices.append(torch.as_tensor(index, dtype=torch.int64))
            bar.update(len(images))
    elapsed = time.perf_counter() - start
    name = desc or "inference"
    if not outputs:
        raise ValueError(f"{name}: the loader is empty")
    out, lab, idx = torch.cat(outputs), torch.cat(labels), torch.cat(indices)
    if len(out) != size:
        raise RuntimeError(f"{name}: got {len(out)} outputs for {size} items (drop_last?)")
    if not isinstance(loader.sampler, SequentialSampler):
        order = torch.argsort(idx)
        out, lab = out[order], lab[order]
    return out, lab, size / elapsed if elapsed > 0 else float("inf")


def random_pixels(batch_size: int, image_size: int) -> torch.Tensor:
    """A uint8 N×3×H×W batch of random pixels, the loaders' format."""
    return torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)


def benchmark_forward(
    module: torch.nn.Module,
    runtime: Runtime,
    batch_size: int,
    image_size: int,
    batches: int = 3,
    warmup: int = 1,
) -> float:
    """Model-only forward images/s on random pixels: the ceiling a data pipeline can reach.

    `module` takes uint8 pixel batches, as the loaders yield them (its first layer is a
    `PixelNormalize`), so the ceiling includes the normalisation the stages run too.
    """
    module = prepare_module(module, runtime).eval()
    images = to_device(random_pixels(batch_size, image_size), runtime)
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
