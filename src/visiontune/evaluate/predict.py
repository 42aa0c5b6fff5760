"""Top-k predictions for image files and folders from a model file (`visiontune predict`)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from visiontune.data.dataset import create_loader
from visiontune.data.images import is_image_name
from visiontune.evaluate.tta import TtaDataset, ViewMaker, predict_views, tta_views
from visiontune.models.classifier import ImageClassifier, ModelInfo
from visiontune.runtime import Runtime


@dataclass(frozen=True)
class Prediction:
    """The top-k (label, probability) of one input, or why it could not be read."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


def collect_inputs(paths: Iterable[str | Path]) -> tuple[list[Path], list[Prediction]]:
    """Expand folders (recursively, image suffixes only, sorted); keep named files as given.

    Returns:
        The files to predict, and error entries for inputs that yield nothing.
    """
    files: list[Path] = []
    errors: list[Prediction] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
            if not found:
                errors.append(Prediction(str(path), error="folder holds no image files"))
            files.extend(found)
        else:
            files.append(path)  # missing or unreadable files are reported when decoded
    return files, errors


def predict_files(
    model: ImageClassifier,
    info: ModelInfo,
    files: Sequence[Path],
    runtime: Runtime,
    *,
    top_k: int,
    n_augment: int,
    zoom: float,
    batch_size: int,
) -> list[Prediction]:
    """Predict every file; unreadable ones come back with `error` set, in input order.

    With `n_augment` > 0 the probabilities are the TTA average over the plain centre
    crop and `n_augment` fixed views, exactly as `evaluate` scores them.
    """
    if not files:
        return []
    views = ViewMaker(info.data_config, tta_views(n_augment), zoom=zoom)
    dataset = TtaDataset(files, None, views, skip_unreadable=True)
    loader = create_loader(dataset, batch_size, runtime, shuffle=False, seed=0)
    output = predict_views(model, loader, runtime, desc="predict")
    k = min(top_k, len(info.classes))
    probs, indices = torch.topk(output.tta, k, dim=1)
    results = []
    for i, path in enumerate(files):
        if output.errors[i]:
            results.append(Prediction(str(path), error=output.errors[i]))
            continue
        top = [
            (info.classes[j], float(p)) for p, j in zip(probs[i], indices[i].tolist(), strict=True)
        ]
        results.append(Prediction(str(path), top=top))
    return results
