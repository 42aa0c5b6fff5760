"""Train the classifier head on cached backbone features (fastai's `precompute=True`).

The features sit in memory as one tensor, so an epoch is a few matrix products: seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import pandas as pd
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from visiontune.config import HeadParams
from visiontune.fileio import atomic_path
from visiontune.models.head import create_head, init_from_source
from visiontune.models.record import METADATA_KEY, ModelInfo
from visiontune.train.lr_find import LrFindResult, find_lr
from visiontune.train.schedules import create_schedule, set_lrs
from visiontune.train.step import train_step

# The quick sweep for `lr: auto`: wide range, ~100 mini-batches of features.
AUTO_LR_RANGE = (1.0e-6, 10.0)
AUTO_LR_ITER = 100
AUTO_LR_SMOOTH, AUTO_LR_DIVERGE = 0.98, 4.0  # fastai's EMA and stop rule


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
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; use 'sgd' or 'adamw'")


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
    """(loss, accuracy) of the head in eval mode on feature tensors."""
    was_training = head.training
    head.eval()
    logits = head(x)
    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing).item()
    acc = (logits.argmax(1) == y).float().mean().item()
    head.train(was_training)
    return loss, acc


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
    """Fit BN → dropout → linear (optional hidden layers) by SGD, a cosine schedule per step.

    `params.lr="auto"` first runs the LR range test on the features and takes its `valley`.
    `source` (the backbone's pretrained classifier weight and bias) starts the head as
    that classifier re-labelled to these classes (`init_from_source`) instead of at random.
    Runs on one CPU thread: for 64×1280 matrices, thread synchronisation costs more than
    it saves, and far more on a shared machine.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_head(
            train_x, train_y, valid_x, valid_y, num_classes, params, seed=seed, source=source
        )
    finally:
        torch.set_num_threads(threads)


def _train_head(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    valid_x: torch.Tensor,
    valid_y: torch.Tensor,
    num_classes: int,
    params: HeadParams,
    *,
    seed: int,
    source: tuple[torch.Tensor, torch.Tensor] | None,
) -> HeadResult:
    hidden, dropout, epochs = params.hidden, params.dropout, params.epochs
    batch_size, lr, label_smoothing = params.batch_size, params.lr, params.label_smoothing
    torch.manual_seed(seed)
    train_x, valid_x = train_x.float(), valid_x.float()
    head = create_head(train_x.shape[1], num_classes, hidden, dropout)
    if source is not None:
        init_from_source(head, train_x, train_y, *source)
    init_loss, init_acc = evaluate_head(head, valid_x, valid_y, label_smoothing)
    generator = torch.Generator().manual_seed(seed)
    batches = feature_batches(train_x, train_y, min(batch_size, len(train_x)), generator)
    opt = create_optimizer(head.parameters(), params.optimizer, 1.0, params.weight_decay)

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return train_step(head, opt, x, y, label_smoothing=label_smoothing)[0]

    head.train()
    found = None
    if lr == "auto":
        low, high = AUTO_LR_RANGE
        found = find_lr(
            head,
            opt,
            batches,
            step,
            [1.0],
            start_lr=low,
            end_lr=high,
            num_iter=AUTO_LR_ITER,
            smooth=AUTO_LR_SMOOTH,
            diverge=AUTO_LR_DIVERGE,
        )
        lr = found.suggestion("valley")
    steps_per_epoch = max(1, len(train_x) // batch_size)
    schedule = create_schedule("sgdr", steps_per_epoch=steps_per_epoch, cycle_len=epochs)
    rows = []
    start = time.perf_counter()
    for epoch in range(epochs):
        total, correct, seen = torch.zeros(()), torch.zeros(()), 0
        for i in range(steps_per_epoch):
            set_lrs(opt, [lr], schedule(epoch * steps_per_epoch + i))
            x, y = next(batches)
            loss, logits = train_step(head, opt, x, y, label_smoothing=label_smoothing)
            total += loss * len(y)
            correct += (logits.argmax(1) == y).sum()
            seen += len(y)
        valid_loss, valid_acc = evaluate_head(head, valid_x, valid_y, label_smoothing)
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
    head.eval()
    history = pd.DataFrame(rows)
    last = rows[-1]
    metrics = {
        "valid_acc": last["valid_acc"],
        "valid_loss": last["valid_loss"],
        "train_acc": last["train_acc"],
        "train_loss": last["train_loss"],
        "lr": float(lr),
        "epochs": epochs,
        "init": "random" if source is None else "source",
        "init_valid_acc": init_acc,
        "init_valid_loss": init_loss,
        "train_seconds": seconds,
        "n_train": len(train_x),
        "n_valid": len(valid_x),
    }
    return HeadResult(head, history, metrics, found)


# What an unusable head file's error tells the user to do.
HEAD_RERUN = "re-run `dvc repro train_head`"


def save_head(path: Path, head: nn.Sequential, info: ModelInfo) -> None:
    """Write the head's state dict as safetensors, the model's record as its metadata."""
    state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: info.to_json()})


def read_head_info(path: Path) -> ModelInfo:
    """The model's record as train_head wrote it beside the head (no tensors read)."""
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        return ModelInfo.from_json((handle.metadata() or {}).get(METADATA_KEY), str(path),
                                   HEAD_RERUN)  # fmt: skip


def load_head(path: Path) -> tuple[nn.Sequential, ModelInfo]:
    """Rebuild a head saved by `save_head` (eval mode) and return it with the record."""
    info = read_head_info(path)
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118
    head = create_head(info.head_in_features, len(info.classes), info.head_hidden,
                       info.head_dropout)  # fmt: skip
    head.load_state_dict(state, strict=True)
    return head.eval(), info
