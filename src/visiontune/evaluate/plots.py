"""Report figures as PNGs (confusion matrix, top losses, Grad-CAM, LR finder, LR schedule)
and markdown tables. Figures are `matplotlib.figure.Figure`s, never pyplot's global state."""

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


def save_figure(fig: Figure, path: str | Path) -> None:
    """Write `fig` as PNG atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)


def confusion_figure(counts: np.ndarray, classes: Sequence[str], normalize: bool = True) -> Figure:
    """Confusion matrix (rows actual, columns predicted) legible from 2 to ~150 classes: cells,
    fonts and margins scale with the class count. With `normalize`, colours are row shares."""
    n = len(classes)
    totals = counts.sum(axis=1, keepdims=True)
    shares = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
    values = shares if normalize else counts
    cell = 1.1 if n <= 4 else 0.5 if n <= 15 else 0.3 if n <= 40 else 0.16
    label_size = 11 if n <= 15 else 8 if n <= 40 else 6
    # Room for the longest class name: DejaVu Sans glyphs average about 0.6 em.
    margin = max((len(s) for s in classes), default=1) * label_size * 0.6 / 72 + 0.7
    side = n * cell
    width, height = max(margin + side + 1.3, 6.0), margin + side + 0.9
    fig = Figure(figsize=(width, height))
    ax = fig.add_axes((margin / width, margin / height, side / width, side / height))
    vmax = 1 if normalize else max(values.max(), 1)
    # Many classes: most errors are a few % of a row, which a square-root scale keeps visible.
    norm = PowerNorm(0.5, vmin=0, vmax=vmax) if n > 15 else Normalize(vmin=0, vmax=vmax)
    image = ax.imshow(values, cmap="Blues", norm=norm)
    cax = fig.add_axes(((margin + side + 0.2) / width, margin / height, 0.2 / width, side / height))
    fig.colorbar(image, cax=cax).set_label("share of actual class" if normalize else "images")
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
    if n <= 40:  # counts while cells are big enough to read, row shares too where few
        detailed = n <= 4
        fontsize = 14 if detailed else 8 if n <= 15 else 6
        dark = norm(values) > 0.55
        for i, j in np.ndindex(n, n):
            if counts[i, j] or detailed:
                text = f"{counts[i, j]}\n{shares[i, j]:.1%}" if detailed else f"{counts[i, j]}"
                color = "white" if dark[i, j] else "black"
                ax.text(j, i, text, ha="center", va="center", fontsize=fontsize, color=color)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    fig.suptitle(
        f"Confusion matrix\n{n} classes, {int(counts.sum())} images, accuracy {accuracy:.1%}",
        y=1 - 0.1 / height,
        fontsize=10 if n <= 40 else 12,
    )
    return fig


def top_losses_figure(images: Sequence[Image.Image], rows: pd.DataFrame) -> Figure:
    """Grid of the worst images (fastai's plot_top_losses), titled from `rows`' columns."""
    k = len(images)
    cols = min(4, max(k, 1)) if k <= 8 else math.ceil(math.sqrt(k))
    nrows = max(math.ceil(k / cols), 1)
    fig = Figure(figsize=(2.7 * cols, 3.1 * nrows + 0.4), layout="constrained")
    fig.suptitle("Top losses: actual / predicted (probability) / loss", fontsize=12)
    for i, (image, row) in enumerate(zip(images, rows.itertuples(index=False), strict=True)):
        ax = fig.add_subplot(nrows, cols, i + 1)
        ax.imshow(np.asarray(image))
        ax.set_axis_off()
        predicted = f"{short_name(row.predicted)} ({row.prob:.2f})"
        title = f"actual: {short_name(row.label)}\npredicted: {predicted}\nloss: {row.loss:.2f}"
        ax.set_title(title, fontsize=8, loc="left")
    if k == 0:
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
    return fig


def grad_cam_figure(
    images: Sequence[Image.Image], maps: Sequence[torch.Tensor], rows: pd.DataFrame
) -> Figure:
    """Each top-loss image beside its Grad-CAM for the actual and the predicted class
    (`maps[i]`: [2, H, W] in [0, 1]), two images to a row."""
    nrows = max(math.ceil(len(images) / 2), 1)
    fig = Figure(figsize=(2.2 * 6, 2.5 * nrows + 0.4), layout="constrained")
    title = "Where the model looked: the image, then Grad-CAM for actual and predicted"
    fig.suptitle(title, fontsize=12)
    entries = zip(images, maps, rows.itertuples(index=False), strict=True)
    for i, (image, cams, row) in enumerate(entries):
        name = short_name(row.path.rsplit("/", 1)[-1])
        label, predicted = short_name(row.label), short_name(row.predicted)
        for j, caption in enumerate((name, f"actual: {label}", f"predicted: {predicted}")):
            ax = fig.add_subplot(nrows, 6, i * 3 + j + 1)
            ax.imshow(np.asarray(image))
            if j:
                ax.imshow(cams[j - 1].numpy(), cmap="jet", alpha=0.45, vmin=0.0, vmax=1.0)
            ax.set_axis_off()
            ax.set_title(caption, fontsize=8, loc="left")
    if not len(images):
        fig.text(0.5, 0.5, "no images", ha="center", va="center")
    return fig


def short_name(name: str, limit: int = 26) -> str:
    """`name` cut to `limit` characters, an ellipsis where cut."""
    return name if len(name) <= limit else name[: limit - 1] + "…"


def lr_find_figure(curve: pd.DataFrame, suggestion: float | None) -> Figure:
    """Smoothed and raw loss against learning rate (log x), the suggested LR marked."""
    fig = Figure(figsize=(7, 4.5))
    ax = fig.add_subplot()
    ax.plot(curve["lr"], curve["smoothed_loss"], color="C0", label="smoothed loss")
    ax.plot(curve["lr"], curve["loss"], color="C0", alpha=0.25, linewidth=0.8, label="loss")
    if suggestion is not None:
        ax.axvline(suggestion, color="C3", linestyle="--", linewidth=1)
        at = np.interp(np.log(suggestion), np.log(curve["lr"]), curve["smoothed_loss"])
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
    groups = [c for c in steps.columns if c.startswith("lr_group")]  # steps.csv: group order
    fig = Figure(figsize=(8, 6))
    ax_lr, ax_loss = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    for column in groups:
        ax_lr.plot(steps["step"], steps[column], label=column.replace("lr_group", "group "))
    ax_lr.set_yscale("log")
    ax_lr.set_ylabel("learning rate (log scale)")
    ax_lr.set_title("LR schedule per parameter group")
    ax_lr.legend(fontsize=8)
    ax_lr.grid(True, which="both", alpha=0.3)
    window = max(len(steps) // 50, 1)
    if window > 1:  # per-step losses are noisy; overlay a running mean
        ax_loss.plot(steps["step"], steps["loss"], color="0.7", linewidth=0.7, label="loss")
        smooth = steps["loss"].rolling(window, min_periods=1).mean()
        ax_loss.plot(steps["step"], smooth, color="C0", label=f"mean of {window} steps")
    else:
        ax_loss.plot(steps["step"], steps["loss"], color="C0", label="loss")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend(fontsize=8)
    for step in steps["step"][steps["epoch"].diff().fillna(0) != 0]:
        for ax in (ax_lr, ax_loss):
            ax.axvline(step, color="0.6", linestyle=":", linewidth=0.8)
    ax_loss.set_xlabel("step (dotted lines: epoch starts)")
    ax_loss.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return fig


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table, floats to 3 decimals (no tabulate dependency)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    rows = [
        "| " + " | ".join(format(v, ".3f") if isinstance(v, float) else str(v) for v in row) + " |"
        for row in frame.itertuples(index=False)
    ]
    return "\n".join([header, rule, *rows])
