"""The evaluate step: score a model on the validation images, with and without TTA."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch

from visiontune.config import TtaParams
from visiontune.data.dataset import create_loader
from visiontune.data.manifest import label_indices
from visiontune.distributed import SINGLE, DistContext, all_reduce_max, gather_shards, shard
from visiontune.evaluate import metrics
from visiontune.evaluate.tta import TtaDataset, ViewMaker, average_views, predict_views, tta_views
from visiontune.runtime import LoaderWait, Runtime, peak_gpu_mib

if TYPE_CHECKING:
    from visiontune.models.classifier import ModelInfo


@dataclass(frozen=True)
class Evaluation:
    """Everything `evaluate` writes; the tables are of the TTA probabilities."""

    metrics: dict[str, float]
    predictions: pd.DataFrame  # path, label, predicted, prob, loss
    per_class: pd.DataFrame  # class, precision, recall, f1, support
    probabilities: pd.DataFrame  # path + one column per class
    views: tuple[str, ...]


def evaluate_model(
    model: torch.nn.Module,
    info: ModelInfo,
    frame: pd.DataFrame,
    image_root: Path,
    tta: TtaParams,
    runtime: Runtime,
    dist: DistContext = SINGLE,
) -> Evaluation:
    """Score `model` on the images of `frame` (path relative to `image_root`, label): the
    centre crop (plain metrics) and `tta.n_augment` views. Under torchrun each rank predicts
    every world_size-th image, gathered back in table order: each image counts once and every
    rank returns the same Evaluation."""
    classes = info.classes
    views = tta_views(tta.n_augment, info.trained_on_mirrors("the model file"))
    labels = label_indices(frame["label"], classes, "the validation table")
    paths = shard([Path(image_root) / p for p in frame["path"]], dist)
    maker = ViewMaker(info.data_config, views, zoom=tta.zoom)
    dataset = TtaDataset(paths, shard(labels.tolist(), dist), maker)
    wait = LoaderWait()
    if len(dataset) > 0 or not dist.enabled:
        loader = create_loader(dataset, tta.batch_size, runtime, shuffle=False, seed=0)
        local = predict_views(model, loader, runtime, f"evaluate ({len(views)} views)", wait)
        probs, seconds = local.probs, local.seconds
    else:  # more ranks than images
        probs, seconds = torch.zeros(0, len(views), len(classes)), 0.0
    probs = gather_shards(probs, len(frame), dist)
    # Where a GPU run's time went (this rank's loader; the bench reads it).
    wait_share = wait.seconds / seconds if seconds > 0 else 0.0
    seconds = all_reduce_max(seconds, dist)
    plain, tta_probs = probs[:, 0].numpy(), average_views(probs).numpy()
    plain_scores = metrics.summary(plain, labels)
    tta_scores = metrics.summary(tta_probs, labels)
    per_class = metrics.per_class_table(tta_probs, labels, classes)
    change = metrics.paired_change(plain.argmax(1) == labels, tta_probs.argmax(1) == labels)
    headline = {
        **plain_scores,  # accuracy, loss
        **{f"{k}_tta": v for k, v in tta_scores.items()},
        "tta_gain": tta_scores["accuracy"] - plain_scores["accuracy"],
        "tta_images_gained": change["gained"],
        "tta_images_lost": change["lost"],
        "tta_gain_p": change["p"],
        **{f"{k}_tta": v for k, v in metrics.macro_scores(per_class).items()},
        "n_images": len(labels),
        "n_views": len(views),
        "seconds": seconds,
        "images_per_s": len(labels) / seconds if seconds > 0 else float("nan"),
        "data_wait_share": wait_share,
        "peak_gpu_mib": peak_gpu_mib(runtime),
    }
    probabilities = pd.DataFrame(tta_probs.astype(np.float64), columns=list(classes))
    probabilities.insert(0, "path", list(frame["path"]))
    return Evaluation(
        metrics=headline,
        predictions=metrics.predictions_table(list(frame["path"]), tta_probs, labels, classes),
        per_class=per_class,
        probabilities=probabilities,
        views=tuple(view.name for view in views),
    )
