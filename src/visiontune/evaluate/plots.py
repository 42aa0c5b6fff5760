"""Report figures as PNGs (confusion matrix, top losses, LR finder and LR schedule) and
the markdown tables beside them.

Figures are built on `matplotlib.figure.Figure` directly (rendered by Agg when saved), so
nothing here touches pyplot's global state or needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from matplotlib.colors import Normalize, PowerNorm
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

from visiontune.fileio import atomic_path

DPI = 110


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write `fig` as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI)


def _text_width_in(labels: Sequence[str], fontsize: float) -> float:
    # Average glyph width of DejaVu Sans is about 0.6 em.
    return max((len(s) for s in labels), default=1) * fontsize * 0.6 / 72


def confusion_figure(
    matrix: np.ndarray, classes: Sequence[str], normalize: bool = True, title: str = ""
) -> Figure:
    """Confusion matrix (rows actual, columns predicted) that stays legible from 2 to ~150 classes.

    Cell size, fonts and margins scale with the class count; cells are annotated with
    counts (and row percentages for small matrices) while they are big enough to read.
    With `normalize`, colours are row fractions (recall on the diagonal).
    """
    n = len(classes)
    counts = np.asarray(matrix)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    values = shares if normalize else counts
    cell = 1.1 if n <= 4 else 0.5 if n <= 15 else 0.3 if n <= 40 else 0.16
    label_size = 11 if n <= 15 else 8 if n <= 40 else 6
    left = _text_width_in(classes, label_size) + 0.7
    bottom = left
    side = n * cell
    width, height = max(left + side + 1.3, 6.0), bottom + side + 0.9
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((left / width, bottom / height, side / width, side / height))
    vmax = 1 if normalize else max(values.max(), 1)
    # With many classes most errors are a few percent of a row: a square-root colour
    # scale keeps them visible next to the dark diagonal.
    norm = PowerNorm(0.5, vmin=0, vmax=vmax) if n > 15 else Normalize(vmin=0, vmax=vmax)
    image = ax.imshow(values, cmap="Blues", norm=norm)
    cax = fig.add_axes(((left + side + 0.2) / width, bottom / height, 0.2 / width, side / height))
    colorbar = fig.colorbar(image, cax=cax)
    colorbar.set_label("share of actual class" if normalize else "images")
    ticks = np.arange(n)
    ax.set_xticks(ticks, labels=classes, rotation=90, fontsize=label_size)
    ax.set_yticks(ticks, labels=classes, fontsize=label_size)
    ax.set_xlabel("predicted", fontsize=max(label_size, 9))
    ax.set_ylabel("actual", fontsize=max(label_size, 9))
    if n > 15:  # faint cell borders help follow a row across a large matrix
        ax.set_xticks(ticks - 0.5, minor=True)
        ax.set_yticks(ticks - 0.5, minor=True)
        ax.grid(which="minor", color="0.9", linewidth=0.3)
        ax.tick_params(which="minor", length=0)
    if n <= 40:
        _annotate(ax, counts, shares, dark=norm(values) > 0.55, detailed=n <= 4)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    heading = title or "Confusion matrix"
    fig.suptitle(
        f"{heading}\n{n} classes, {int(counts.sum())} images, accuracy {accuracy:.1%}",
        y=1 - 0.1 / height,
        fontsize=10 if n <= 40 else 12,
    )
    return fig


def _annotate(ax, counts: np.ndarray, shares: np.ndarray, dark: np.ndarray, detailed: bool) -> None:
    n = len(counts)
    fontsize = 14 if detailed else 8 if n <= 15 else 6
    for i in range(n):
        for j in range(n):
            if counts[i, j] == 0 and not detailed:
                continue
            text = f"{counts[i, j]}\n{shares[i, j]:.1%}" if detailed else f"{counts[i, j]}"
            ax.text(j, i, text, ha="center", va="center", fontsize=fontsize,
                    color="white" if dark[i, j] else "black")  # fmt: skip


def top_losses_figure(images: Sequence[Image.Image], rows: pd.DataFrame) -> Figure:
    """Grid of the worst images (fastai's plot_top_losses): actual, predicted, prob, loss.

    `rows` has columns label, predicted, prob, loss in the order of `images`.
    """
    k = len(images)
    cols = min(4, max(k, 1)) if k <= 8 else math.ceil(math.sqrt(k))
    nrows = max(math.ceil(k / cols), 1)
    fig = Figure(figsize=(2.7 * cols, 3.1 * nrows + 0.4), layout="constrained")
    fig.suptitle("Top losses: actual / predicted (probability) / loss", fontsize=12)
    for i, (image, row) in enumerate(zip(images, rows.itertuples(index=False), strict=True)):
        ax = fig.add_subplot(nrows, cols, i + 1)
        ax.imshow(np.asarray(image))
        ax.set_axis_off()
        ax.set_title(
            f"actual: {short_name(row.label)}\n"
            f"predicted: {short_name(row.predicted)} ({row.prob:.2f})\n"
            f"loss: {row.loss:.2f}",
            fontsize=8,
            loc="left",
        )
    if k == 0:
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
    return fig


def grad_cam_figure(
    images: Sequence[Image.Image], maps: Sequence[torch.Tensor], rows: pd.DataFrame
) -> Figure:
    """Each top-loss image beside its Grad-CAM for the actual and the predicted class
    (`maps[i]`: [2, H, W] in [0, 1]), two images to a row."""
    per_row = 2
    nrows = max(math.ceil(len(images) / per_row), 1)
    fig = Figure(figsize=(2.2 * 3 * per_row, 2.5 * nrows + 0.4), layout="constrained")
    fig.suptitle("Where the model looked: the image, then Grad-CAM for actual and predicted",
                 fontsize=12)  # fmt: skip
    entries = zip(images, maps, rows.itertuples(index=False), strict=True)
    for i, (image, cams, row) in enumerate(entries):
        titles = (short_name(row.path.rsplit("/", 1)[-1]), f"actual: {short_name(row.label)}",
                  f"predicted: {short_name(row.predicted)}")  # fmt: skip
        for j, title in enumerate(titles):
            ax = fig.add_subplot(nrows, 3 * per_row, i * 3 + j + 1)
            ax.imshow(np.asarray(image))
            if j:
                ax.imshow(cams[j - 1].numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            ax.set_axis_off()
            ax.set_title(title, fontsize=8, loc="left")
    if not len(images):
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
    return fig


def short_name(name: str, limit: int = 26) -> str:
    """`name` cut to `limit` characters, an ellipsis where cut."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def lr_find_figure(curve: pd.DataFrame, suggestion: float | None, loss_column: str) -> Figure:
    """Loss against learning rate (log x) with the suggested LR marked."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(curve["lr"], curve[loss_column], color="C0", label=loss_column.replace("_", " "))
    if loss_column != "loss" and "loss" in curve:
        ax.plot(curve["lr"], curve["loss"], color="C0", alpha=0.25, linewidth=0.8, label="loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="C3", linestyle="--", linewidth=1)
        at = np.interp(np.log(suggestion), np.log(curve["lr"]), curve[loss_column])
        ax.plot([suggestion], [at], "o", color="C3", label=f"suggestion {suggestion:.2e}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (log scale)")
    ax.set_ylabel("training loss")
    ax.set_title("LR finder")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def lr_schedule_figure(steps: pd.DataFrame) -> Figure:
    """LR of every parameter group per step (log y) above the training loss per step."""
    groups = sorted(
        (c for c in steps.columns if c.startswith("lr_group")), key=lambda c: int(c[8:])
    )
    fig = Figure(figsize=(8, 6))
    ax_lr, ax_loss = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for column in groups:
        ax_lr.plot(steps["step"], steps[column], label=column.replace("lr_group", "group "))
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate (log scale)")
    ax_lr.set_title("LR schedule per parameter group")
    ax_lr.legend(fontsize=8)
    ax_lr.grid(True, which="both", alpha=0.3)
    if "loss" in steps:
        window = max(len(steps) // 50, 1)
        if window > 1:  # per-step losses are noisy; overlay a running mean
            ax_loss.plot(steps["step"], steps["loss"], color="0.7", linewidth=0.7, label="loss")
            smooth = steps["loss"].rolling(window, min_periods=1).mean()
            ax_loss.plot(steps["step"], smooth, color="C0", label=f"mean of {window} steps")
        else:
            ax_loss.plot(steps["step"], steps["loss"], color="C0", label="loss")
        ax_loss.set_ylabel("training loss")
        ax_loss.legend(fontsize=8)
    if "epoch" in steps:
        starts = steps["step"][steps["epoch"].diff().fillna(0) != 0]
        for ax in (ax_lr, ax_loss):
            for step in starts:
                ax.axvline(step, color="0.6", linestyle=":", linewidth=0.8)
    ax_loss.set_xlabel("step (dotted lines: epoch starts)")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def markdown_table(frame: pd.DataFrame, floats: str = ".3f") -> str:
    """A GitHub-flavoured markdown table (no tabulate dependency)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = [
        "| " + " | ".join(format(v, floats) if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])
