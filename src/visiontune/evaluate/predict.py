"""`visiontune predict`: top-k labels or a submission table for image files and folders,
streamed a loader batch at a time, so memory stays flat however many images."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch

from visiontune.data.dataset import create_loader
from visiontune.data.images import is_image_name
from visiontune.evaluate.submission import submission_writer
from visiontune.evaluate.tta import TtaDataset, ViewMaker, average_views, iter_view_batches
from visiontune.models.classifier import ImageClassifier, InferenceSettings, ModelInfo
from visiontune.runtime import Runtime, resolve_precision

if TYPE_CHECKING:
    from visiontune.config import Params

ID_KINDS = ("stem", "path")


def inference_from_params(params: Params) -> InferenceSettings:
    """The views and precision evaluate would use under `params` here (`predict --params`)."""
    return InferenceSettings(params.tta.n_augment, params.tta.zoom, resolve_precision(params.base))


@dataclass(frozen=True)
class Prediction:
    """The top-k (label, probability) of one input, or why it could not be read."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Inputs:
    """Files to predict, the folder (or None) each was found in, and inputs that gave none."""

    files: list[Path]
    roots: list[Path | None]
    errors: list[Prediction]


def find_inputs(paths: Iterable[str | Path]) -> Inputs:
    """Expand folders (recursively, image suffixes only, sorted); keep named files as given."""
    inputs = Inputs([], [], [])
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
            if not found:
                inputs.errors.append(Prediction(str(path), error="folder holds no image files"))
            inputs.files.extend(found)
            inputs.roots.extend([path] * len(found))
        else:
            inputs.files.append(path)  # missing or unreadable files are reported when decoded
            inputs.roots.append(None)
    return inputs


def image_ids(inputs: Inputs, kind: str) -> list[str]:
    """Submission ids: the file name without extension (`stem`), or the path relative to the
    folder it was found in (`path`; a file named directly: its name); unique, or ValueError."""
    seen: dict[str, Path] = {}
    for path, root in zip(inputs.files, inputs.roots, strict=True):
        if kind == "stem":
            image_id = path.stem
        else:
            image_id = path.relative_to(root).as_posix() if root else path.name
        if image_id in seen:
            hint = " (use --id path)" if kind == "stem" else ""
            raise ValueError(f"{seen[image_id]} and {path} share the id {image_id!r}{hint}")
        seen[image_id] = path
    return list(seen)


def _batches(
    model: ImageClassifier,
    views: ViewMaker,
    files: Sequence[Path],
    runtime: Runtime,
    batch_size: int,
    desc: str,
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """(dataset rows, TTA-averaged probabilities B×C, errors) per loader batch, in order."""
    if not files:
        return
    dataset = TtaDataset(files, None, views, skip_unreadable=True)
    loader = create_loader(dataset, batch_size, runtime, shuffle=False, seed=0)
    for rows, probs, _, errors in iter_view_batches(model, loader, runtime, desc):
        yield rows.tolist(), average_views(probs), errors


def predict_files(
    model: ImageClassifier,
    info: ModelInfo,
    files: Sequence[Path],
    runtime: Runtime,
    views: ViewMaker,
    *,
    top_k: int,
    batch_size: int,
) -> list[Prediction]:
    """Predict every file, in input order (unreadable ones with `error` set), averaging over
    `views` (the model's own: `create_views`) as `evaluate` and the served model do."""
    k = min(top_k, len(info.classes))
    results: list[Prediction] = []
    for rows, probs, errors in _batches(model, views, files, runtime, batch_size, "predict"):
        top_p, top_i = torch.topk(probs, k, dim=1)
        for row, p, idx, error in zip(rows, top_p, top_i, errors, strict=True):
            pairs = zip(p.tolist(), idx.tolist(), strict=True)
            top = [] if error else [(info.classes[j], q) for q, j in pairs]
            results.append(Prediction(str(files[row]), top=top, error=error or None))
    return results


@dataclass(frozen=True)
class SubmissionSummary:
    rows: int
    errors: list[Prediction]


def write_submission(
    model: ImageClassifier,
    info: ModelInfo,
    files: Sequence[Path],
    ids: Sequence[str],
    runtime: Runtime,
    views: ViewMaker,
    out: TextIO,
    positive: str | None = None,
    batch_size: int = 32,
) -> SubmissionSummary:
    """Write `id` + one probability column per class, or the `positive` class's alone, a row
    per readable image as the batches come; unreadable ones come back in the summary."""
    writer, columns = submission_writer(out, list(info.classes), positive)
    errors: list[Prediction] = []
    for rows, probs, batch_errors in _batches(
        model, views, files, runtime, batch_size, "submission"
    ):
        for row, p, error in zip(rows, probs[:, columns].tolist(), batch_errors, strict=True):
            if error:
                errors.append(Prediction(str(files[row]), error=error))
            else:
                writer.writerow([ids[row], *(f"{q:.6g}" for q in p)])
    return SubmissionSummary(len(files) - len(errors), errors)
