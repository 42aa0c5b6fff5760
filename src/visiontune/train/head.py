"""Train the classifier head on cached backbone features (fastai's `precompute=True`: an epoch
is a few matrix products on one in-memory tensor), and save and load head files."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from visiontune.config import HeadParams
from visiontune.fileio import atomic_path
from visiontune.models.head import create_head, init_from_source
from visiontune.models.record import METADATA_KEY, ModelInfo, read_model_info
from visiontune.train.lr_find import LrFindResult, find_lr
from visiontune.train.schedules import create_schedule, set_lrs
from visiontune.train.step import train_step

# The quick sweep for `lr: auto`: a wide range, ~100 mini-batches, fastai's EMA and stop rule.
AUTO_LR_SWEEP: dict[str, Any] = dict(
    start_lr=1.0e-6, end_lr=10.0, num_iter=100, smooth=0.98, diverge=4.0
)


@dataclass(frozen=True)
class HeadResult:
    """The trained head (eval mode), its per-epoch history and final metrics."""

    head: nn.Sequential
    history: pd.DataFrame
    metrics: dict[str, Any]
    lr_find: LrFindResult | None


def create_optimizer(
    params: Any,
    name: Literal["sgd", "adamw"],
    lr: float,
    weight_decay: float,
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """SGD with momentum (the course's choice) or AdamW."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)


def feature_batches(
    x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled mini-batches of in-memory tensors, epoch after epoch, forever."""
    while True:
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x) - batch_size + 1, batch_size):  # drop the ragged tail
            index = order[start : start + batch_size]
            yield x[index], y[index]


@torch.no_grad()
def evaluate_head(
    head: nn.Module, x: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0
) -> tuple[float, float]:
    """(loss, accuracy) of the head on feature tensors; it is left in eval mode."""
    logits = head.eval()(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing).item()
    return loss, (logits.argmax(1) == y).float().mean().item()


def train_head(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    valid_x: torch.Tensor,
    valid_y: torch.Tensor,
    num_classes: int,
    params: HeadParams,
    *,
    seed: int,
    source: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> HeadResult:
    """Fit BN → dropout → linear (optional hidden layers) by SGD, cosine-scheduled per step;
    `params.lr: auto` takes the `valley` of an LR range test on the features. `source` (the
    pretrained classifier's weight, bias) starts the head re-labelled (`init_from_source`).
    One CPU thread: on 64×1280 matrices syncing threads costs more than it saves."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        train_x, valid_x = train_x.float(), valid_x.float()
        head = create_head(train_x.shape[1], num_classes, params.hidden, params.dropout)
        if source is not None:
            init_from_source(head, train_x, train_y, *source)
        init_loss, init_acc = evaluate_head(head, valid_x, valid_y, params.label_smoothing)
        generator = torch.Generator().manual_seed(seed)
        batch_size = min(params.batch_size, len(train_x))
        batches = feature_batches(train_x, train_y, batch_size, generator)
        opt = create_optimizer(head.parameters(), params.optimizer, 1.0, params.weight_decay)

        def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return train_step(head, opt, x, y, label_smoothing=params.label_smoothing)[0]

        head.train()
        lr, found = params.lr, None
        if lr == "auto":
            found = find_lr(head, opt, batches, step, [1.0], **AUTO_LR_SWEEP)
            lr = found.suggestion("valley")
        steps_per_epoch = max(1, len(train_x) // params.batch_size)
        schedule = create_schedule("sgdr", steps_per_epoch=steps_per_epoch, cycle_len=params.epochs)
        rows = []
        start = time.perf_counter()
        for epoch in range(params.epochs):
            head.train()
            total, correct, seen = torch.zeros(()), torch.zeros(()), 0
            for i in range(steps_per_epoch):
                set_lrs(opt, [lr], schedule(epoch * steps_per_epoch + i))
                x, y = next(batches)
                loss, logits = train_step(head, opt, x, y, label_smoothing=params.label_smoothing)
                total += loss * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
            valid_loss, valid_acc = evaluate_head(head, valid_x, valid_y, params.label_smoothing)
            rows.append(
                {
                    "epoch": epoch,
                    "train_loss": (total / seen).item(),
                    "train_acc": (correct / seen).item(),
                    "valid_loss": valid_loss,
                    "valid_acc": valid_acc,
                    "lr": lr * schedule(epoch * steps_per_epoch),
                }
            )
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    last = rows[-1]
    metrics = {
        **{key: last[key] for key in ("valid_acc", "valid_loss", "train_acc", "train_loss")},
        "lr": float(lr),
        "epochs": params.epochs,
        "init": "random" if source is None else "source",
        "init_valid_acc": init_acc,
        "init_valid_loss": init_loss,
        "train_seconds": seconds,
        "n_train": len(train_x),
        "n_valid": len(valid_x),
    }
    return HeadResult(head.eval(), pd.DataFrame(rows), metrics, found)


def save_head(path: Path, head: nn.Sequential, info: ModelInfo) -> None:
    """Write the head's state dict as safetensors, the model's record as its metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: info.to_json()})


def load_head(path: Path) -> tuple[nn.Sequential, ModelInfo]:
    """Rebuild a head saved by `save_head` (eval mode) and return it with the record."""
    info = read_model_info(path, "re-run `dvc repro train_head`")
    head = create_head(
        info.head_in_features, len(info.classes), info.head_hidden, info.head_dropout
    )
    head.load_state_dict(load_file(str(path)), strict=True)
    return head.eval(), info
