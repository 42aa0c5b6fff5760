"""The one training step (forward, loss, backward, optimizer step) that the head, the LR
finder and the fine-tune share, so they train alike; `bench/limits.py` times its bare form."""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

from visiontune.runtime import Runtime, autocast, to_device


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    label_smoothing: float,
    runtime: Runtime | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimizer step on a batch, at the LRs already set: (loss, logits), detached. With a
    `runtime` the batch moves to its device and the forward runs under its autocast; without,
    tensors are in place and fp32 (the head on cached features). `scaler`: for fp16."""
    if runtime is not None:
        inputs, targets = to_device(inputs, runtime), to_device(targets, runtime)
    with autocast(runtime) if runtime is not None else contextlib.nullcontext():
        logits = model(inputs)
    loss = F.cross_entropy(logits.float(), targets, label_smoothing=label_smoothing)
    optimizer.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimizer.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    return loss.detach(), logits.detach()
