"""Predictions for image files and folders from a model file (`visiontune predict`): the
top-k labels of each image, or a submission table (id + a probability per class).

Both stream: each loader batch is reduced (top-k) or written out as it comes, so the
memory stays flat however many images a folder holds.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

import torch
from tqdm.auto import tqdm

from visiontune.data.dataset import create_loader
from visiontune.data.images import is_image_name
from visiontune.evaluate.submission import submission_writer
from visiontune.evaluate.tta import TtaDataset, ViewMaker, average_views, iter_view_batches
from visiontune.models.classifier import ImageClassifier, InferenceSettings, ModelInfo
from visiontune.runtime import Runtime

if TYPE_CHECKING:
    from visiontune.config import Params

ID_KINDS = ("stem", "path")


def inference_from_params(params: Params) -> InferenceSettings:
    """The views and precision the evaluate stage would score with under `params` on this
    host (`tta`, and `base.precision` resolved): `visiontune predict --params`."""
    from visiontune.runtime import resolve_precision

    return InferenceSettings(params.tta.n_augment, params.tta.zoom, resolve_precision(params.base))


@dataclass(frozen=True)
class Prediction:
    """The top-k (label, probability) of one input, or why it could not be read."""

    path: str
    top: list[tuple[str, float]] = field(default_factory=list)
    error: str | None = None


@dataclass(frozen=True)
class Inputs:
    """The files to predict, the folder (or None) each was found in, and inputs that gave
    nothing (an empty folder)."""

    files: list[Path]
    roots: list[Path | None]
    errors: list[Prediction]


def find_inputs(paths: Iterable[str | Path]) -> Inputs:
    """Expand folders (recursively, image suffixes only, sorted); keep named files as given,
    with the folder each file was found in."""
    files: list[Path] = []
    roots: list[Path | None] = []
    errors: list[Prediction] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and is_image_name(p))
            if not found:
                errors.append(Prediction(str(path), error="folder holds no image files"))
            files.extend(found)
            roots.extend([path] * len(found))
        else:
            files.append(path)  # missing or unreadable files are reported when decoded
            roots.append(None)
    return Inputs(files, roots, errors)


def image_ids(inputs: Inputs, kind: str) -> list[str]:
    """Submission ids: the file name without extension (`stem`), or the path relative to the
    folder it was found in (`path`; a file named directly: its name).

    Raises:
        ValueError: two files would share an id.
    """
    if kind not in ID_KINDS:
        raise ValueError(f"id must be one of {ID_KINDS}, got {kind!r}")
    ids = []
    for path, root in zip(inputs.files, inputs.roots, strict=True):
        if kind == "stem":
            ids.append(path.stem)
        else:
            ids.append(path.relative_to(root).as_posix() if root else path.name)
    seen: dict[str, Path] = {}
    for image_id, path in zip(ids, inputs.files, strict=True):
        if image_id in seen:
            hint = " (use --id path)" if kind == "stem" else ""
            raise ValueError(f"{seen[image_id]} and {path} share the id {image_id!r}{hint}")
        seen[image_id] = path
    return ids


def _batches(
    model: ImageClassifier,
    views: ViewMaker,
    files: Sequence[Path],
    runtime: Runtime,
    batch_size: int,
    desc: str,
) -> Iterator[tuple[list[int], torch.Tensor, list[str]]]:
    """(dataset rows, TTA-averaged probabilities B×C, errors) per loader batch, in order."""
    dataset = TtaDataset(files, None, views, skip_unreadable=True)
    loader = create_loader(dataset, batch_size, runtime, shuffle=False, seed=0)
    with tqdm(total=len(files), desc=desc, unit="img", leave=False, mininterval=1.0) as bar:
        for batch in iter_view_batches(model, loader, runtime):
            yield batch.index.tolist(), average_views(batch.probs), batch.errors
            bar.update(len(batch.index))


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
    """Predict every file; unreadable ones come back with `error` set, in input order.

    The probabilities are the average over `views` (the model's own: `create_views`),
    exactly as `evaluate` and the served model compute them.
    """
    if not files:
        return []
    k = min(top_k, len(info.classes))
    results: list[Prediction] = []
    for rows, probs, errors in _batches(model, views, files, runtime, batch_size, "predict"):
        top_p, top_i = torch.topk(probs, k, dim=1)
        for row, p, idx, error in zip(rows, top_p, top_i, errors, strict=True):
            if error:
                results.append(Prediction(str(files[row]), error=error))
                continue
            top = [(info.classes[j], float(q)) for q, j in zip(p, idx.tolist(), strict=True)]
            results.append(Prediction(str(files[row]), top=top))
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
    """Write `id` + one probability column per class (class order), or + the `positive`
    class's column alone, one row per readable image, as the batches come.

    Unreadable images get no row; they come back in the summary (the caller reports them).
    """
    writer, columns = submission_writer(out, list(info.classes), positive)
    rows = 0
    errors: list[Prediction] = []
    if not files:
        return SubmissionSummary(0, errors)
    for batch_rows, probs, batch_errors in _batches(
        model, views, files, runtime, batch_size, "submission"
    ):
        for row, p, error in zip(batch_rows, probs[:, columns].tolist(), batch_errors, strict=True):
            if error:
                errors.append(Prediction(str(files[row]), error=error))
                continue
            writer.writerow([ids[row], *(f"{q:.6g}" for q in p)])
            rows += 1
    return SubmissionSummary(rows, errors)
