"""The `visiontune` console script: `visiontune predict` with a model file evaluate wrote, at
its own TTA views and precision (as the served MLflow model), never a params.yaml found here."""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import sys
from collections.abc import Sequence
from typing import TextIO

from rich.console import Console
from rich.table import Column, Table

from visiontune.evaluate.predict import (
    ID_KINDS,
    Prediction,
    find_inputs,
    image_ids,
    inference_from_params,
    predict_files,
    write_submission,
)
from visiontune.models.classifier import load_model_file
from visiontune.runtime import AutoMemory, configure_memory, loader_workers
from visiontune.serving.predictor import create_views, inference_settings, predicting_runtime


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _report(message: object, code: int = 2) -> int:
    """Print `message` on stderr as predict's; `code` is the exit status to return with it."""
    print(f"visiontune predict: {message}", file=sys.stderr)
    return code


def _predict(args: argparse.Namespace) -> int:
    found = find_inputs(args.paths)
    try:
        # Large tensors on huge pages, freed memory kept for the next batch (see runtime).
        configure_memory(AutoMemory())
        model, info = load_model_file(args.model)
    except (OSError, ValueError, RuntimeError) as exc:
        return _report(f"cannot load {args.model}: {exc}")
    try:
        ids = image_ids(found, args.id) if args.submission else []
        if args.params:  # --params FILE, else the model's record; --precision wins over both
            from visiontune.config import load_params  # pydantic: only where it is needed

            settings = inference_from_params(load_params(args.params))
        else:
            settings = inference_settings(info, args.model)
        if args.precision != "model":
            settings = dataclasses.replace(settings, precision=args.precision)
        views = create_views(info, settings, args.tta)
    except ValueError as exc:  # ids, params file or record: the message says what to do
        return _report(exc)
    # Worker processes cost more than they save for a handful of images.
    workers = 0 if len(found.files) <= args.batch_size else loader_workers("auto")
    try:
        runtime, note = predicting_runtime(settings.precision, args.device, workers)
        model = model.to(runtime.device)
    except (OSError, ValueError, RuntimeError) as exc:
        return _report(f"cannot load {args.model}: {exc}")
    if note:
        _report(note)
    if not args.submission:
        results = found.errors + predict_files(
            model, info, found.files, runtime, views, top_k=args.top_k, batch_size=args.batch_size
        )
        for result in results:
            if result.error:
                _report(f"{result.path}: {result.error}")
        write_results(results, args.format, sys.stdout)
        if all(result.error for result in results):
            return _report("no image could be predicted", code=1)
        return 0
    if args.positive is not None and args.positive not in info.classes:
        return _report(f"--positive {args.positive!r} is not one of the classes {info.classes}")
    from visiontune.fileio import atomic_open  # pandas: only where it is needed

    to_stdout = args.submission == "-"
    with contextlib.nullcontext(sys.stdout) if to_stdout else atomic_open(args.submission) as out:
        summary = write_submission(
            model, info, found.files, ids, runtime, views, out, args.positive, args.batch_size
        )
    errors = found.errors + summary.errors
    for error in errors:
        _report(f"{error.path}: {error.error}")
    where = "stdout" if to_stdout else args.submission
    _report(f"{summary.rows} images predicted, {len(errors)} unreadable (left out) -> {where}")
    # An empty test folder gives a header alone; files that all fail are an error.
    return 0 if summary.rows or not found.files else 1


def write_results(results: Sequence[Prediction], fmt: str, out: TextIO) -> None:
    """Print predictions as a table, CSV (one row per label) or JSON (one object per input)."""
    if fmt == "json":
        rows = [
            {
                "path": r.path,
                "predictions": [{"label": label, "probability": p} for label, p in r.top],
                "error": r.error,
            }
            for r in results
        ]
        json.dump(rows, out, indent=2)
        out.write("\n")
    elif fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["path", "rank", "label", "probability", "error"])
        for r in results:
            if r.error:
                writer.writerow([r.path, "", "", "", r.error])
            for rank, (label, p) in enumerate(r.top, start=1):
                writer.writerow([r.path, rank, label, f"{p:.6f}", ""])
    else:
        image = Column("image", overflow="fold")
        probability = Column("probability", justify="right")
        table = Table(image, "prediction", probability, "next best", header_style="bold")
        for r in results:
            if not r.error:  # errors are reported on stderr
                (label, p), rest = r.top[0], r.top[1:]
                others = ", ".join(f"{name} {q:.3f}" for name, q in rest)
                table.add_row(r.path, label, f"{p:.3f}", others)
        Console(file=out).print(table)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="visiontune", description="Use models trained by the visiontune pipeline."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    predict = commands.add_parser(
        "predict",
        help="top-k labels, or a submission CSV, for images or folders of images",
        description="Predict the top-k labels of images (folders are searched recursively), "
        "or write a submission CSV with --submission. The TTA views and precision are the "
        "model file's own, as the served MLflow model uses them. Unreadable files are "
        "reported on stderr and the rest are still predicted; the exit status is 0 when at "
        "least one image was predicted.",
    )
    predict.add_argument(
        "model", help="model file written by evaluate (outputs/evaluate/model.safetensors)"
    )
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--top-k", type=_positive_int, default=3, help="labels per image")
    predict.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format"
    )
    predict.add_argument(
        "--tta",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="average the model's TTA views (its inference settings; on by default); "
        "--no-tta: the centre crop alone",
    )
    predict.add_argument(
        "--params",
        metavar="FILE",
        help="predict with this params file's TTA views (tta) and precision "
        "(base.precision) instead of those the model was evaluated with",
    )
    predict.add_argument(
        "--submission",
        metavar="FILE",
        help="write id + one probability column per class (class order) to FILE ('-': stdout)",
    )
    predict.add_argument(
        "--id",
        choices=ID_KINDS,
        default="stem",
        help="submission id: file name without extension, or path relative to its folder",
    )
    predict.add_argument(
        "--positive", metavar="CLASS", help="submission: only this class's probability column"
    )
    predict.add_argument("--batch-size", type=_positive_int, default=32)
    predict.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    predict.add_argument(
        "--precision",
        choices=("model", "fp32", "bf16", "fp16"),
        default="model",
        help="compute precision (default: the model's)",
    )
    return _predict(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
