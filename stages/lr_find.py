"""lr_find: the LR range test on the whole network (pretrained body + trained head, unfrozen)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visiontune import tracking
from visiontune.data.manifest import read_split
from visiontune.fileio import save_config, write_csv, write_json
from visiontune.runtime import resolve_runtime, seed_everything
from visiontune.stagekit import StageExit, open_stage, print_outputs, wait_for_tracking
from visiontune.train.recipes import (
    StaleHeadError,
    create_train_dataset,
    load_classifier,
    resolve_lr_ratios,
    run_lr_find,
)
from visiontune.train.schedules import group_lrs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--train", default="data/split/train.csv", help="training table")
    parser.add_argument("--images", default="data/prepared", help="folder the paths are under")
    parser.add_argument("--head", default="outputs/head/head.safetensors", help="trained head")
    parser.add_argument("--out", default="outputs/lr_find", help="output folder")
    args = parser.parse_args(argv)
    try:
        # Params validated before any work; the tracking run opens alongside.
        params, tracker = open_stage("lr_find", args.params)
    except StageExit as exc:
        return exc.code

    seed_everything(params.base.seed, params.base.deterministic)
    runtime = resolve_runtime(params.base, params.runtime)
    try:
        finetune = resolve_lr_ratios(params.finetune, Path(args.head))
        model, info, _ = load_classifier(params.model, Path(args.head))
        train = read_split(Path(args.train), Path(args.images))
    except (OSError, ValueError, StaleHeadError) as exc:
        print(f"lr_find failed: {exc}", file=sys.stderr)
        return 1
    dataset = create_train_dataset(train, info.classes, info.data_config, finetune.augment)
    if code := wait_for_tracking(tracker):
        return code
    try:
        result = run_lr_find(
            model, dataset, finetune, params.lr_find, runtime, seed=params.base.seed
        )
    except ValueError as exc:  # too few points before the loss diverged
        print(f"lr_find failed: {exc}", file=sys.stderr)
        return 1

    out = Path(args.out)
    lr = result.suggestion(params.lr_find.method)
    suggestion = {
        "method": params.lr_find.method,
        "lr": lr,
        "suggestions": result.suggestions,
        "group_lrs": group_lrs(lr, finetune.lr_ratios),
        "lr_ratios": list(finetune.lr_ratios),
        "stopped_early": result.stopped_early,
        "iterations": len(result.curve),
    }
    write_csv(out / "curve.csv", result.curve)
    write_json(out / "suggestion.json", suggestion)
    save_config(
        out / "config.json",
        {"base": params.base, "model": params.model, "lr_find": params.lr_find,
         "finetune": finetune,
         "runtime": {"device": str(runtime.device), "precision": runtime.precision}},
    )  # fmt: skip
    others = ", ".join(f"{k} {v:.2e}" for k, v in sorted(result.suggestions.items()))
    print(
        f"lr_find: {len(result.curve)} iterations"
        f"{' (stopped: loss diverged)' if result.stopped_early else ''}; "
        f"{params.lr_find.method} suggests lr {lr:.2e} ({others})"
    )
    print_outputs("lr_find", out)
    # Tracking: mirror the written outputs into MLflow (exit 1 only if tracking.required).
    return tracking.log_stage(tracker, params, out)


if __name__ == "__main__":
    raise SystemExit(main())
