"""finetune: unfreeze, differential LRs over layer groups, SGDR per step; resumable.

SIGTERM checkpoints and exits with 143; running the stage again resumes from there. Under
torchrun: DistributedDataParallel, finetune.batch_size is the global batch, rank 0 writes.
"""

from __future__ import annotations

from dataclasses import replace

from tqdm.auto import tqdm

from visiontune.data.manifest import read_split
from visiontune.distributed import shard, torch_stage
from visiontune.fileio import read_json
from visiontune.stagekit import Stage, StageError, run_stage
from visiontune.train.checkpoint import discard_checkpoint, stop_on_signals
from visiontune.train.loop import TrainingInterrupted, finetune
from visiontune.train.recipes import (
    create_train_dataset,
    create_valid_loader,
    load_classifier,
    resolve_finetune,
    resume_config,
    save_finetune,
)

SIGTERM_EXIT = 143  # 128 + SIGTERM, what a shell reports for a process killed by it
PATHS = {
    "train": "training table",
    "valid": "validation table",
    "prepared": "image folder",
    "head": "trained head",
    "suggestion": "lr_find suggestion (for finetune.lr: auto)",
    "out": "output folder",
}


def finetune_stage(stage: Stage):
    params, paths, runtime, dist = stage.params, stage.paths, stage.runtime, stage.dist
    model, info, weights = load_classifier(params.model, paths.head)
    ft = resolve_finetune(params.finetune, info)
    lr = ft.lr if ft.lr != "auto" else float(read_json(paths.suggestion)["lr"])
    info = replace(info, mirror=ft.augment.flip is True)  # the TTA views follow the training
    train, valid = read_split(paths.train, paths.prepared), read_split(paths.valid, paths.prepared)
    dataset = create_train_dataset(train, info.classes, info.data_config, ft.augment)
    # Each rank validates its share of the images; the logits are gathered.
    valid_loader = create_valid_loader(
        shard(valid, dist), info.classes, info.data_config, ft.batch_size, runtime, params.base.seed
    )
    config = resume_config(params, ft, lr, runtime, weights, paths.head, paths.train)
    steps = len(dataset) // min(ft.batch_size, len(dataset)) * ft.epochs
    bar = tqdm(total=steps, desc="finetune", unit="step", mininterval=5.0, disable=not dist.is_main)
    with stop_on_signals() as stop, bar:
        try:
            result = finetune(
                model,
                dataset,
                valid_loader,
                ft,
                runtime,
                lr=lr,
                seed=params.base.seed,
                checkpoint_dir=paths.out / "checkpoints",
                config=config,
                stop=stop,
                on_step=lambda step: bar.update(step - bar.n),
                on_epoch=stage.tracker.log_epoch,
                log=tqdm.write if dist.is_main else (lambda line: None),
                dist=dist,
                sync_bn=params.distributed.sync_bn,
                valid_total=len(valid),
            )
        except TrainingInterrupted as exc:
            raise StageError(
                f"{exc}; run it again to resume", SIGTERM_EXIT, "interrupted"
            ) from None
    if not dist.is_main:
        return None
    m = save_finetune(paths.out, result, info, lr, {**config, "world_size": dist.world_size})
    print(
        f"finetune: {m['epochs']} epochs, valid_acc {m['valid_acc']:.4f} "
        f"(loss {m['valid_loss']:.4f}), lr {lr:.2e}, {m['images_per_s']:.1f} img/s"
    )
    # The last checkpoint goes once the outputs are logged: a failed log reruns the stage,
    # which then resumes at the end instead of training again.
    stage.after_logging = lambda: discard_checkpoint(paths.out / "checkpoints")
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("finetune", finetune_stage, PATHS, setup=torch_stage, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
