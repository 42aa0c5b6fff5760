"""The training step: forward, loss, backward, optimizer step.

The head's SGD on cached features, the LR finder and the fine-tune all take it from here,
so they train alike (the same loss, the same fp16 loss scaling). The bench's train-step
limit stays the bare step (`bench/limits.py`): it measures what this costs.
"""

from __future__ import annotations

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
    """One optimizer step on a batch, at the LRs already set: (loss, logits), detached.

    `runtime`: the batch moves to its device and the forward runs under its autocast (the
    whole network); None: the tensors are in place and fp32 (the head on cached
    features). `scaler`: the GradScaler that fp16 autocast needs.
    """
    if runtime is not None:
        inputs, targets = to_device(inputs, runtime), to_device(targets, runtime)
        with autocast(runtime):
            logits = model(inputs)
    else:
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
