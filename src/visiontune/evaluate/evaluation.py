"""The evaluate step: score a model on the validation images, with and without TTA."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from visiontune.config import TtaParams
from visiontune.data.dataset import create_loader
from visiontune.distributed import SINGLE, DistContext, all_reduce_max, gather_shards, shard
from visiontune.evaluate import metrics
from visiontune.evaluate.tta import TtaDataset, ViewMaker, ViewPredictions, predict_views, tta_views
from visiontune.runtime import LoaderWait, Runtime, peak_gpu_mib

if TYPE_CHECKING:
    from visiontune.models.classifier import ModelInfo


@dataclass(frozen=True)
class Evaluation:
    """Everything `evaluate` writes: headline metrics and the per-image/per-class tables."""

    metrics: dict[str, float]
    predictions: pd.DataFrame  # path, label, predicted, prob, loss (TTA probabilities)
    per_class: pd.DataFrame  # class, precision, recall, f1, support (TTA predictions)
    probabilities: pd.DataFrame  # path + one column per class (TTA probabilities)
    views: tuple[str, ...]


def label_indices(labels: Sequence[str], classes: Sequence[str]) -> np.ndarray:
    """Map class names to indices, naming any label the model does not know."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise ValueError(
            f"labels not among the model's {len(classes)} classes: {', '.join(unknown[:10])}"
        )
    return np.array([index[name] for name in labels], dtype=np.int64)


def score_predictions(
    predictions: ViewPredictions, paths: Sequence[str], classes: Sequence[str], views: Sequence[str]
) -> Evaluation:
    """Turn per-view probabilities into metrics and tables (plain = view 0, TTA = mean)."""
    labels = predictions.labels.numpy()
    plain = predictions.plain.numpy()
    tta = predictions.tta.numpy()
    plain_scores = metrics.summary(plain, labels)
    tta_scores = metrics.summary(tta, labels)
    per_class = metrics.per_class_table(tta, labels, classes)
    change = metrics.paired_change(plain.argmax(1) == labels, tta.argmax(1) == labels)
    headline = {
        "accuracy": plain_scores["accuracy"],
        "loss": plain_scores["loss"],
        "accuracy_tta": tta_scores["accuracy"],
        "loss_tta": tta_scores["loss"],
        "tta_gain": tta_scores["accuracy"] - plain_scores["accuracy"],
        "tta_images_gained": change["gained"],
        "tta_images_lost": change["lost"],
        "tta_gain_p": change["p"],
        **{f"{k}_tta": v for k, v in metrics.macro_scores(per_class).items()},
        "n_images": len(labels),
        "n_views": len(views),
        "seconds": predictions.seconds,
        "images_per_s": predictions.images_per_s,
    }
    probabilities = pd.DataFrame(tta.astype(np.float64), columns=list(classes))
    probabilities.insert(0, "path", list(paths))
    return Evaluation(
        metrics=headline,
        predictions=metrics.predictions_table(paths, tta, labels, classes),
        per_class=per_class,
        probabilities=probabilities,
        views=tuple(views),
    )


def evaluate_model(
    model: torch.nn.Module,
    info: ModelInfo,
    frame: pd.DataFrame,
    image_root: Path,
    tta: TtaParams,
    runtime: Runtime,
    dist: DistContext = SINGLE,
) -> Evaluation:
    """Score `model` on the images of `frame` (columns path relative to `image_root`, label).

    One pass decodes each image once and runs the plain centre crop plus `tta.n_augment`
    fixed views (no mirrored ones where the model was not trained on mirrors) through the
    model; plain metrics come from the centre-crop view. Under
    torchrun each rank predicts every world_size-th image (no padding duplicates) and the
    probabilities are gathered back in table order, so every image counts exactly once;
    every rank returns the same Evaluation.
    """
    classes, data_config = info.classes, info.data_config
    views = tta_views(tta.n_augment, info.trained_on_mirrors("the model file"))
    labels = label_indices(list(frame["label"]), classes)
    root = Path(image_root)
    paths = shard([root / p for p in frame["path"]], dist)
    local_labels = shard(labels.tolist(), dist)
    dataset = TtaDataset(paths, local_labels, ViewMaker(data_config, views, zoom=tta.zoom))
    wait = LoaderWait()
    if len(dataset) > 0 or not dist.enabled:
        loader = create_loader(dataset, tta.batch_size, runtime, shuffle=False, seed=0)
        desc = f"evaluate ({len(views)} views)"
        local = predict_views(model, loader, runtime, desc=desc, wait=wait)
        probs, seconds = local.probs, local.seconds
    else:  # more ranks than images
        probs, seconds = torch.zeros(0, len(views), len(classes)), 0.0
    if dist.enabled:
        predictions = ViewPredictions(
            probs=gather_shards(probs, len(frame), dist),
            labels=torch.as_tensor(labels),
            errors=[""] * len(frame),
            seconds=all_reduce_max(seconds, dist),
        )
    else:
        predictions = local
    names = [view.name for view in views]
    evaluation = score_predictions(predictions, list(frame["path"]), classes, names)
    # Where a GPU run's time went (this rank's loader; the bench reads it).
    evaluation.metrics["data_wait_share"] = wait.seconds / seconds if seconds > 0 else 0.0
    evaluation.metrics["peak_gpu_mib"] = peak_gpu_mib(runtime)
    return evaluation
