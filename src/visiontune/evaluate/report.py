"""The report step: confusion matrix, most confused pairs, top losses, LR plots and report.md,
all from the TTA probabilities `evaluate` scored, so report and metrics never disagree."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torchvision.transforms.v2.functional as TF
from sklearn.metrics import confusion_matrix

from visiontune.config import ReportParams
from visiontune.data.images import UnreadableImageError
from visiontune.data.manifest import label_indices
from visiontune.data.pixels import open_pixels
from visiontune.data.transforms import DataConfig, eval_crop
from visiontune.evaluate import metrics, plots
from visiontune.evaluate.gradcam import grad_cam
from visiontune.fileio import write_csv, write_text
from visiontune.models.classifier import ImageClassifier


@dataclass(frozen=True)
class ReportFiles:
    """Paths of everything `build_report` wrote (for the stage and for tracking)."""

    report: Path
    confusion_png: Path
    confusion_csv: Path
    most_confused_csv: Path
    top_losses_png: Path
    grad_cam_png: Path
    lr_find_png: Path
    lr_schedule_png: Path

    def images(self) -> list[Path]:
        pngs = [self.confusion_png, self.top_losses_png, self.grad_cam_png, self.lr_find_png]
        return [*pngs, self.lr_schedule_png]


def read_probabilities(
    probabilities_csv: Path, predictions_csv: Path
) -> tuple[np.ndarray, np.ndarray, list[str], list[str]]:
    """TTA probabilities (N×C), label indices, paths and classes written by `evaluate`."""
    probs = pd.read_csv(probabilities_csv, keep_default_na=False, dtype={"path": str})
    labelled = pd.read_csv(predictions_csv, keep_default_na=False, dtype=str)
    if list(probs["path"]) != list(labelled["path"]):
        raise ValueError(f"{probabilities_csv} and {predictions_csv} list different images")
    classes = [str(c) for c in probs.columns[1:]]
    labels = label_indices(labelled["label"], classes, str(predictions_csv))
    return probs[classes].to_numpy(np.float64), labels, list(labelled["path"]), classes


def build_report(
    out_dir: Path,
    probs: np.ndarray,
    labels: np.ndarray,
    paths: Sequence[str],
    classes: Sequence[str],
    image_root: Path,
    data_config: DataConfig,
    model: ImageClassifier,
    eval_metrics: Mapping[str, float],
    params: ReportParams,
    lr_curve: pd.DataFrame,
    lr_suggestion: float | None,
    steps: pd.DataFrame,
) -> ReportFiles:
    """Write every report file into `out_dir` (each atomically) and return their paths."""
    table = metrics.predictions_table(paths, probs, labels, classes)
    counts = confusion_matrix(table["label"], table["predicted"], labels=list(classes))
    files = ReportFiles(
        report=out_dir / "report.md",
        confusion_png=out_dir / "confusion.png",
        confusion_csv=out_dir / "confusion.csv",
        most_confused_csv=out_dir / "most_confused.csv",
        top_losses_png=out_dir / "top_losses.png",
        grad_cam_png=out_dir / "top_losses_gradcam.png",
        lr_find_png=out_dir / "lr_find.png",
        lr_schedule_png=out_dir / "lr_schedule.png",
    )
    # One row per image: what DVC's confusion template counts.
    actual = table.rename(columns={"label": "actual"})
    write_csv(files.confusion_csv, actual[["actual", "predicted"]])
    confused = metrics.most_confused(counts, classes, params.most_confused)
    write_csv(files.most_confused_csv, confused)
    figure = plots.confusion_figure(counts, classes, normalize=params.normalize_confusion)
    plots.save_figure(figure, files.confusion_png)
    worst = table.sort_values("loss", ascending=False, kind="stable").head(params.top_losses)
    size = data_config.image_size
    views = []  # the pixels the model saw without TTA, decoded as the loaders decode
    for rel in worst["path"]:
        try:
            pixels = open_pixels(image_root / rel, min_size=data_config.resize_size)
            views.append(eval_crop(pixels, data_config))
        except UnreadableImageError:  # moved or damaged since evaluate: keep its row, grey tile
            views.append(torch.full((3, size, size), 200, dtype=torch.uint8))
    images = [TF.to_pil_image(view) for view in views]
    plots.save_figure(plots.top_losses_figure(images, worst), files.top_losses_png)
    maps = [
        grad_cam(model, view, label_indices([row.label, row.predicted], classes, "the top losses"))
        for view, row in zip(views, worst.itertuples(index=False), strict=True)
    ]
    plots.save_figure(plots.grad_cam_figure(images, maps, worst), files.grad_cam_png)
    plots.save_figure(plots.lr_find_figure(lr_curve, lr_suggestion), files.lr_find_png)
    plots.save_figure(plots.lr_schedule_figure(steps), files.lr_schedule_png)
    per_class = metrics.per_class_table(probs, labels, classes)
    text = render_markdown(eval_metrics, per_class, confused, worst, files, lr_suggestion)
    write_text(files.report, text)
    return files


def tta_gain_line(m: Mapping[str, float]) -> str:
    """TTA's gain in points and in images, with the exact McNemar p of that split."""
    gained, lost, p = int(m["tta_images_gained"]), int(m["tta_images_lost"]), m["tta_gain_p"]
    line = f"TTA gain: {m['tta_gain'] * 100:+.2f} accuracy points"
    if gained + lost == 0:
        return f"{line}: TTA changed no image's verdict."
    line += (
        f": {gained} images right that the centre crop got wrong, {lost} the other way "
        f"(exact McNemar p = {p:.2g})"
    )
    return f"{line}: a split that chance alone often gives." if p >= 0.05 else f"{line}."


def render_markdown(
    m: Mapping[str, float],
    per_class: pd.DataFrame,
    confused: pd.DataFrame,
    worst: pd.DataFrame,
    files: ReportFiles,
    lr_suggestion: float | None,
) -> str:
    """report.md: headline numbers `m`, the weakest classes, most confused pairs, figures."""
    lines = [
        "# Evaluation report",
        "",
        f"{int(m['n_images'])} validation images, {len(per_class)} classes; TTA averages "
        f"the softmax of {int(m['n_views'])} fixed views (centre crop + "
        f"{int(m['n_views']) - 1} augmented).",
        "",
        "| | plain (centre crop) | TTA |",
        "|---|---|---|",
        f"| accuracy | {m['accuracy']:.4f} | {m['accuracy_tta']:.4f} |",
        f"| loss | {m['loss']:.4f} | {m['loss_tta']:.4f} |",
        "",
        tta_gain_line(m),
        "",
        f"![confusion matrix]({files.confusion_png.name})",
        "",
    ]
    if len(per_class) <= 20:
        lines += ["## Per-class scores (TTA)", "", plots.markdown_table(per_class), ""]
    else:
        weakest = per_class.nsmallest(10, "f1", keep="first")
        lines += ["## The 10 weakest classes (TTA F1)", "", plots.markdown_table(weakest), ""]
    lines += ["## Most confused pairs", ""]
    if len(confused):
        csv_note = f"As CSV: `{files.most_confused_csv.name}`."
        lines += [plots.markdown_table(confused), "", csv_note]
    else:
        lines += ["No confusions: every image was classified correctly."]
    lines += ["", "## Top losses", "", f"![top losses]({files.top_losses_png.name})", ""]
    lines += [plots.markdown_table(worst[["path", "label", "predicted", "prob", "loss"]]), ""]
    lines += [
        "Where the model looked (Grad-CAM of the fine-tuned model over the pixels it saw, for "
        "the actual and the predicted class): on the subject, or on the background?",
        "",
        f"![Grad-CAM of the top losses]({files.grad_cam_png.name})",
        "",
    ]
    suggested = f" (suggested LR {lr_suggestion:.2e})" if lr_suggestion is not None else ""
    lines += ["## LR finder" + suggested, "", f"![LR finder]({files.lr_find_png.name})", ""]
    lines += ["## LR schedule", "", f"![LR schedule]({files.lr_schedule_png.name})", ""]
    return "\n".join(lines)
