"""The `visiontune` console script: subcommands for using a trained model file.

`visiontune predict MODEL PATH...` prints the top-k labels of images or folders of images.
TTA views and loader settings come from the run's params file (`--params`, else
`params.yaml` in the current folder), never from defaults in code.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from rich.console import Console
from rich.table import Table

from visiontune.config import Params, ParamsError, load_params
from visiontune.evaluate.predict import Prediction, collect_inputs, predict_files
from visiontune.models.classifier import load_model_file
from visiontune.runtime import configure_memory, create_runtime

PARAMS_FILE = "params.yaml"


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
        help="top-k labels for images or folders of images",
        description="Predict the top-k labels of images (folders are searched recursively). "
        "Unreadable files are reported on stderr and the rest are still predicted; the exit "
        "status is 0 when at least one image was predicted.",
    )
    predict.add_argument("model", help="model file written by finetune (model.safetensors)")
    predict.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    predict.add_argument("--top-k", type=_positive_int, default=3, help="labels per image")
    predict.add_argument(
        "--format", choices=("table", "csv", "json"), default="table", help="output format"
    )
    predict.add_argument(
        "--tta",
        action="store_true",
        help="average the centre crop and the fixed augmented views of the params' tta section",
    )
    predict.add_argument(
        "--params",
        help=f"the run's params file: TTA views, device, precision, loader and memory "
        f"settings (default: {PARAMS_FILE} in the current folder when there is one)",
    )
    predict.add_argument("--batch-size", type=_positive_int, default=32)
    predict.add_argument(
        "--device", choices=("auto", "cpu", "cuda"), help="default: base.device, else auto"
    )
    predict.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        help="default: base.precision, else auto",
    )
    predict.set_defaults(run=_predict)
    return parser


def _read_params(path: str | None) -> Params | None:
    """The run's params: `path`, else ./params.yaml when there is one, else None."""
    if path is None and not Path(PARAMS_FILE).is_file():
        return None
    return load_params(path or PARAMS_FILE)


def _predict(args: argparse.Namespace) -> int:
    try:
        params = _read_params(args.params)
    except ParamsError as exc:
        print(f"visiontune predict: {exc}", file=sys.stderr)
        return 2
    if args.tta and params is None:
        print(
            f"visiontune predict: --tta takes its views from the run's params (tta.n_augment, "
            f"tta.zoom): pass --params PATH, or run where its {PARAMS_FILE} is",
            file=sys.stderr,
        )
        return 2
    files, missing = collect_inputs(args.paths)
    base = params.base if params else None
    workers = params.runtime.num_workers if params else "auto"
    try:
        if params:
            configure_memory(params.runtime)
        runtime = create_runtime(
            device=args.device or (base.device if base else "auto"),
            precision=args.precision or (base.precision if base else "auto"),
            # Worker processes cost more than they save for a handful of images.
            num_workers=0 if len(files) <= args.batch_size else workers,
            worker_priority=params.runtime.worker_priority if params else "auto",
        )
        model, info = load_model_file(args.model, map_location=runtime.device)
    except (OSError, ValueError, RuntimeError) as exc:
        print(f"visiontune predict: cannot load {args.model}: {exc}", file=sys.stderr)
        return 2
    use_tta = args.tta and params is not None
    results = missing + predict_files(
        model,
        info,
        files,
        runtime,
        top_k=args.top_k,
        n_augment=params.tta.n_augment if use_tta else 0,
        zoom=params.tta.zoom if use_tta else 1.0,
        batch_size=args.batch_size,
    )
    for result in results:
        if result.error:
            print(f"visiontune predict: {result.path}: {result.error}", file=sys.stderr)
    write_results(results, args.format, sys.stdout)
    predicted = sum(1 for r in results if not r.error)
    if not predicted:
        print("visiontune predict: no image could be predicted", file=sys.stderr)
    return 0 if predicted else 1


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
