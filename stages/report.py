"""report: confusion matrix, most confused pairs, top losses and LR plots from the TTA output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from visiontune import tracking
from visiontune.evaluate.report import build_report, read_probabilities
from visiontune.fileio import read_json, save_config
from visiontune.models.classifier import read_model_info
from visiontune.stagekit import StageExit, open_stage, wait_for_tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--evaluate", default="outputs/evaluate", help="evaluate output folder")
    parser.add_argument("--model", default="outputs/finetune/model.safetensors")
    parser.add_argument("--images", default="data/prepared", help="folder the paths are under")
    parser.add_argument("--lr-find", default="outputs/lr_find", help="lr_find output folder")
    parser.add_argument("--steps", default="outputs/finetune/steps.csv", help="per-step LRs")
    parser.add_argument("--out", default="outputs/report", help="output folder")
    args = parser.parse_args(argv)
    try:
        # Params validated before any work; the tracking run opens alongside.
        params, tracker = open_stage("report", args.params)
    except StageExit as exc:
        return exc.code

    evaluated = Path(args.evaluate)
    lr_find = Path(args.lr_find)
    try:
        info = read_model_info(Path(args.model))
        probs, labels, paths, classes = read_probabilities(
            evaluated / "probabilities.csv", evaluated / "predictions.csv"
        )
        eval_metrics = read_json(evaluated / "metrics.json")
        curve = pd.read_csv(lr_find / "curve.csv")
        suggestion = read_json(lr_find / "suggestion.json").get("lr")
        steps = pd.read_csv(args.steps)
    except (OSError, ValueError, KeyError) as exc:
        print(f"report failed: {exc}", file=sys.stderr)
        return 1
    if classes != info.classes:
        print(
            f"report failed: {evaluated / 'probabilities.csv'} has other classes than {args.model}",
            file=sys.stderr,
        )
        return 1

    if code := wait_for_tracking(tracker):
        return code
    files = build_report(
        Path(args.out), probs, labels, paths, classes, Path(args.images), info.data_config,
        eval_metrics, params.report, lr_curve=curve, lr_suggestion=suggestion, steps=steps,
    )  # fmt: skip
    save_config(Path(args.out) / "config.json", {"report": params.report})
    print(f"report: {files.report} ({len(files.images())} figures, {len(classes)} classes)")
    # Tracking: mirror the written outputs into MLflow (exit 1 only if tracking.required).
    return tracking.log_stage(tracker, params, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
