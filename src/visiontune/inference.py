"""Batched forward passes over a loader: eval mode, mixed precision, channels_last, progress."""

from __future__ import annotations

import time

import torch
from torch.utils.data import DataLoader, SequentialSampler
from tqdm.auto import tqdm

from visiontune.runtime import LoaderWait, Runtime, autocast, prepare_module, to_device


def run_inference(
    module: torch.nn.Module,
    loader: DataLoader,
    runtime: Runtime,
    desc: str = "",
    wait: LoaderWait | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Run `module` (moved in place to the runtime's device and memory format, eval mode) over
    `loader`'s `(images, labels, indices)` batches, adding the wait for them to `wait`.

    Returns:
        float32 N×D outputs on the CPU, int64 labels, images/s; in index order when shuffled.
    """
    module = prepare_module(module, runtime).eval()
    size = len(loader.dataset)  # type: ignore[arg-type]
    outputs, labels, indices = [], [], []
    start = time.perf_counter()
    # no_grad, not inference_mode: callers train heads on these outputs afterwards.
    with torch.no_grad(), tqdm(total=size, desc=desc, unit="img", mininterval=1.0) as bar:
        for images, targets, index in (wait or LoaderWait()).batches(loader):
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
