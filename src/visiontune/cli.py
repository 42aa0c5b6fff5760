"""The `visiontune` console script: subcommands for using a trained model file.

`visiontune predict MODEL PATH...` prints the top-k labels of images or folders of images,
or with `--submission FILE` writes a submission table (id + a probability per class). The
TTA views and the precision are those evaluate scored, recorded in the model file it wrote
(outputs/evaluate/model.safetensors), as the served MLflow model uses them. No file in the
current directory changes that: `--params`, `--no-tta` and `--precision` override it only
when given.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.table import Table

from visiontune.evaluate.predict import (
    ID_KINDS,
    Prediction,
    find_inputs,
    image_ids,
    predict_files,
    write_submission,
)
from visiontune.models.classifier import InferenceSettings, ModelInfo, load_model_file
from visiontune.runtime import AutoMemory, configure_memory, loader_workers
from visiontune.serving.predictor import (
    create_views,
    inference_settings,
    predicting_runtime,
)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
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
    predict.set_defaults(run=_predict)
    return parser


def _settings(info: ModelInfo, args: argparse.Namespace) -> InferenceSettings:
    """The TTA views and precision to predict with: those evaluate recorded in the model
    file, unless `--params FILE` names others; `--precision` wins over both."""
    if args.params:
        from visiontune.config import load_params
        from visiontune.evaluate.predict import inference_from_params

        settings = inference_from_params(load_params(args.params))
    else:
        settings = inference_settings(info, args.model)
    if args.precision != "model":
        settings = dataclasses.replace(settings, precision=args.precision)
    return settings


def _predict(args: argparse.Namespace) -> int:
    found = find_inputs(args.paths)
    files = found.files
    try:
        ids = image_ids(found, args.id) if args.submission else []
    except ValueError as exc:
        print(f"visiontune predict: {exc}", file=sys.stderr)
        return 2
    # Worker processes cost more than they save for a handful of images.
    workers = 0 if len(files) <= args.batch_size else loader_workers("auto")
    try:
        # Large tensors on huge pages, freed memory kept for the next batch (see runtime).
        configure_memory(AutoMemory())
        model, info = load_model_file(args.model)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"visiontune predict: cannot load {args.model}: {exc}", file=sys.stderr)
        return 2
    try:
        settings = _settings(info, args)
        views = create_views(info, settings, args.tta)
    except ValueError as exc:  # a bad params file or record: the message says what to do
        print(f"visiontune predict: {exc}", file=sys.stderr)
        return 2
    try:
        runtime, note = predicting_runtime(settings.precision, args.device, workers)
        model = model.to(runtime.device)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"visiontune predict: cannot load {args.model}: {exc}", file=sys.stderr)
        return 2
    if note:
        print(f"visiontune predict: {note}", file=sys.stderr)
    if args.submission:
        return _write_submission(args, model, info, files, ids, runtime, views, found.errors)
    results = found.errors + predict_files(
        model, info, files, runtime, views, top_k=args.top_k, batch_size=args.batch_size
    )
    for result in results:
        if result.error:
            print(f"visiontune predict: {result.path}: {result.error}", file=sys.stderr)
    write_results(results, args.format, sys.stdout)
    predicted = sum(1 for r in results if not r.error)
    if not predicted:
        print("visiontune predict: no image could be predicted", file=sys.stderr)
    return 0 if predicted else 1


def _write_submission(args, model, info, files, ids, runtime, views, missing) -> int:
    from visiontune.fileio import atomic_open

    if args.positive is not None and args.positive not in info.classes:
        print(f"visiontune predict: --positive {args.positive!r} is not one of the classes "
              f"{info.classes}", file=sys.stderr)  # fmt: skip
        return 2
    kwargs = {"positive": args.positive, "batch_size": args.batch_size}
    if args.submission == "-":
        summary = write_submission(model, info, files, ids, runtime, views, sys.stdout, **kwargs)
    else:
        Path(args.submission).parent.mkdir(parents=True, exist_ok=True)
        with atomic_open(args.submission, newline="") as out:
            summary = write_submission(model, info, files, ids, runtime, views, out, **kwargs)
    errors = missing + summary.errors
    for error in errors:
        print(f"visiontune predict: {error.path}: {error.error}", file=sys.stderr)
    where = "stdout" if args.submission == "-" else args.submission
    print(f"visiontune predict: {summary.rows} images predicted, {len(errors)} unreadable "
          f"(left out) -> {where}", file=sys.stderr)  # fmt: skip
    # An empty test folder gives a header alone; files that all fail are an error.
    return 0 if summary.rows or not files else 1


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
        _print_table(results, out)


def _print_table(results: Sequence[Prediction], out: TextIO) -> None:
    table = Table(show_header=True, header_style="bold")
    table.add_column("image", overflow="fold")
    table.add_column("prediction")
    table.add_column("probability", justify="right")
    table.add_column("next best")
    for r in results:
        if r.error:
            continue  # already reported on stderr
        (label, p), rest = r.top[0], r.top[1:]
        others = ", ".join(f"{name} {q:.3f}" for name, q in rest)
        table.add_row(r.path, label, f"{p:.3f}", others)
    Console(file=out).print(table)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    raise SystemExit(main())
