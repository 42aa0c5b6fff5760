"""finetune: unfreeze, differential LRs over layer groups, SGDR per step; resumable.

SIGTERM checkpoints and exits with 143; running the stage again resumes from there.
Under torchrun: DistributedDataParallel, finetune.batch_size is the global batch, rank 0
writes the checkpoints and outputs.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from visiontune import distributed, tracking
from visiontune.data.manifest import read_split
from visiontune.fileio import read_json, save_config, write_csv, write_json
from visiontune.models.classifier import save_model_file
from visiontune.runtime import resolve_runtime, seed_everything
from visiontune.stagekit import StageExit, open_stage, print_outputs, wait_for_tracking
from visiontune.train.checkpoint import discard_checkpoint, stop_on_signals
from visiontune.train.loop import TrainingInterrupted, finetune
from visiontune.train.recipes import (
    StaleHeadError,
    create_train_dataset,
    create_valid_loader,
    load_classifier,
    resolve_lr_ratios,
)

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process killed by it


def sha256_file(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--train", default="data/split/train.csv", help="training table")
    parser.add_argument("--valid", default="data/split/valid.csv", help="validation table")
    parser.add_argument("--images", default="data/prepared", help="folder the paths are under")
    parser.add_argument("--head", default="outputs/head/head.safetensors", help="trained head")
    parser.add_argument(
        "--suggestion", default="outputs/lr_find/suggestion.json", help="for finetune.lr: auto"
    )
    parser.add_argument("--out", default="outputs/finetune", help="output folder")
    args = parser.parse_args(argv)
    try:
        # Params validated before any work; the tracking run opens alongside.
        params, tracker = open_stage("finetune", args.params)
    except StageExit as exc:
        return exc.code

    seed_everything(params.base.seed, params.base.deterministic)
    runtime = resolve_runtime(params.base)
    try:
        if params.distributed.sync_bn:
            distributed.check_sync_bn(runtime)
        # Under torchrun: join the process group (one process per device).
        dist = distributed.init_from_environ(params.distributed, runtime.device.type, os.environ)
    except (distributed.DistributedSetupError, ValueError) as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return _run(args, params, tracker, runtime, dist)
    finally:
        distributed.cleanup(dist)


def _run(args, params, tracker, runtime, dist) -> int:
    runtime = distributed.rank_runtime(runtime, dist, params.base.num_workers == "auto")
    try:
        ft = resolve_lr_ratios(params.finetune, Path(args.head))
        lr = ft.lr if ft.lr != "auto" else float(read_json(args.suggestion)["lr"])
        model, info, weights = load_classifier(params.model, Path(args.head))
        train = read_split(Path(args.train), Path(args.images))
        valid = read_split(Path(args.valid), Path(args.images))
    except (OSError, ValueError, KeyError, StaleHeadError) as exc:
        print(f"finetune failed: {exc}", file=sys.stderr)
        return 1
    dataset = create_train_dataset(train, info.classes, info.data_config, ft.augment)
    global_batch = min(ft.batch_size, len(dataset))
    if global_batch % dist.world_size or len(valid) < dist.world_size:
        print(
            f"finetune: the global batch ({global_batch}, finetune.batch_size) must be "
            f"divisible by the {dist.world_size} processes, and each needs a validation image "
            f"({len(valid)})",
            file=sys.stderr,
        )
        return 2
    # Each rank validates its share of the images; the logits are gathered.
    valid_loader = create_valid_loader(
        distributed.shard(valid, dist),
        info.classes,
        info.data_config,
        ft.batch_size,
        runtime,
        params.base.seed,
    )
    out = Path(args.out)
    # A checkpoint is resumed only when everything that shapes the run is the same.
    config = {
        "base": params.base.model_dump(mode="json"),
        "model": params.model.model_dump(mode="json"),
        "finetune": ft.model_dump(mode="json"),
        "lr": lr,
        "precision": runtime.precision,
        "device": runtime.device.type,
        "weights_sha256": weights.sha256,
        "head_sha256": sha256_file(Path(args.head)),
        "train_sha256": sha256_file(Path(args.train)),
    }
    total = len(dataset) // min(ft.batch_size, len(dataset)) * ft.epochs
    bar = tqdm(total=total, desc="finetune", unit="step", mininterval=5.0, disable=not dist.is_main)
    log = tqdm.write if dist.is_main else (lambda line: None)
    if code := wait_for_tracking(tracker):
        return code
    with stop_on_signals() as stop, bar:
        try:
            result = finetune(
                model, dataset, valid_loader, ft, runtime, lr=lr, seed=params.base.seed,
                checkpoint_dir=out / "checkpoints", config=config, stop=stop,
                on_step=lambda step: bar.update(step - bar.n), log=log, dist=dist,
                sync_bn=params.distributed.sync_bn, valid_total=len(valid),
            )  # fmt: skip
        except TrainingInterrupted as exc:
            print(f"finetune interrupted: {exc}; run it again to resume", file=sys.stderr)
            return SIGTERM_EXIT
    if not dist.is_main:
        return 0  # rank 0 writes the outputs and logs them

    save_model_file(out / "model.safetensors", result.model, info)
    write_csv(out / "steps.csv", result.steps)
    write_csv(out / "history.csv", result.history)
    metrics = {**result.metrics, "lr": lr, "resumed_from_step": result.resumed_from}
    write_json(out / "metrics.json", metrics)
    write_json(out / "layer_groups.json", result.layer_groups)
    save_config(
        out / "config.json",
        {**config, "runtime": {"device": str(runtime.device), "precision": runtime.precision,
                               "channels_last": runtime.channels_last,
                               "world_size": dist.world_size}},
    )  # fmt: skip
    print(
        f"finetune: {metrics['epochs']} epochs, valid_acc {metrics['valid_acc']:.4f} "
        f"(loss {metrics['valid_loss']:.4f}), lr {lr:.2e}, {metrics['images_per_s']:.1f} img/s"
    )
    print_outputs("finetune", out)
    # Tracking: mirror the written outputs into MLflow (exit 1 only if tracking.required).
    code = tracking.log_stage(tracker, params, out)
    if code == 0 and discard_checkpoint(out / "checkpoints"):
        print("finetune: outputs written and logged; removed the final checkpoint")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
