"""evaluate: loss and accuracy of the fine-tuned model on the validation images, plain and TTA."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from visiontune import distributed, tracking
from visiontune.data.manifest import SPLIT_COLUMNS, read_table
from visiontune.evaluate.evaluation import evaluate_model
from visiontune.fileio import save_config, write_csv, write_json
from visiontune.models.classifier import load_model_file
from visiontune.runtime import resolve_runtime, seed_everything
from visiontune.stagekit import StageExit, open_stage, print_outputs, wait_for_tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--model", default="outputs/finetune/model.safetensors")
    parser.add_argument("--valid", default="data/split/valid.csv", help="validation table")
    parser.add_argument("--images", default="data/prepared", help="folder the paths are under")
    parser.add_argument("--out", default="outputs/evaluate", help="output folder")
    args = parser.parse_args(argv)
    try:
        # Params validated before any work; the tracking run opens alongside.
        params, tracker = open_stage("evaluate", args.params)
    except StageExit as exc:
        return exc.code

    seed_everything(params.base.seed, params.base.deterministic)
    runtime = resolve_runtime(params.base, params.runtime)
    try:
        # Under torchrun: join the process group; each rank scores its share of the images.
        dist = distributed.init_from_environ(params.distributed, runtime.device.type, os.environ)
    except distributed.DistributedSetupError as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return _run(args, params, tracker, runtime, dist)
    finally:
        distributed.cleanup(dist)


def _run(args, params, tracker, runtime, dist) -> int:
    runtime = distributed.rank_runtime(runtime, dist, params.runtime.num_workers == "auto")
    try:
        model, info = load_model_file(Path(args.model), map_location=runtime.device)
        valid = read_table(Path(args.valid), SPLIT_COLUMNS)
    except (OSError, ValueError) as exc:
        print(f"evaluate failed: {exc}", file=sys.stderr)
        return 1
    if code := wait_for_tracking(tracker):
        return code
    result = evaluate_model(
        model, info.classes, info.data_config, valid, Path(args.images), params.tta, runtime, dist
    )
    if not dist.is_main:
        return 0  # rank 0 writes the outputs and logs them

    out = Path(args.out)
    write_json(out / "metrics.json", result.metrics)
    write_csv(out / "predictions.csv", result.predictions)
    write_csv(out / "per_class.csv", result.per_class)
    write_csv(out / "probabilities.csv", result.probabilities)
    save_config(
        out / "config.json",
        {"base": params.base, "tta": params.tta, "views": list(result.views),
         "runtime": {"device": str(runtime.device), "precision": runtime.precision,
                     "world_size": dist.world_size}},
    )  # fmt: skip
    m = result.metrics
    print(
        f"evaluate: {m['n_images']} images, accuracy {m['accuracy']:.4f} (loss {m['loss']:.4f}), "
        f"TTA x{m['n_views']} {m['accuracy_tta']:.4f} (loss {m['loss_tta']:.4f}), "
        f"gain {m['tta_gain'] * 100:+.2f} pts, {m['images_per_s']:.1f} img/s"
    )
    print_outputs("evaluate", out)
    # Tracking: mirror the written outputs into MLflow (exit 1 only if tracking.required).
    return tracking.log_stage(tracker, params, out)


if __name__ == "__main__":
    raise SystemExit(main())
