"""lr_find: the LR range test on the whole network (pretrained body + trained head, unfrozen)."""

from __future__ import annotations

from visiontune.data.manifest import read_split
from visiontune.distributed import torch_stage
from visiontune.fileio import write_csv, write_json
from visiontune.stagekit import Stage, run_stage
from visiontune.train.recipes import (
    create_train_dataset,
    load_classifier,
    resolve_finetune,
    run_lr_find,
)
from visiontune.train.schedules import group_lrs

PATHS = {
    "train": "training table",
    "prepared": "folder the image paths are under",
    "head": "trained head",
    "out": "output folder",
}


def lr_find(stage: Stage):
    params, paths, runtime = stage.params, stage.paths, stage.runtime
    method = params.lr_find.method
    model, info, _ = load_classifier(params.model, paths.head)
    finetune = resolve_finetune(params.finetune, info)
    train = read_split(paths.train, paths.prepared)
    dataset = create_train_dataset(train, info.classes, info.data_config, finetune.augment)
    # Too few points before the loss diverged is a ValueError: the runner reports it.
    result = run_lr_find(model, dataset, finetune, params.lr_find, runtime, seed=params.base.seed)
    lr, iterations = result.suggestion(method), len(result.curve)
    write_csv(paths.out / "curve.csv", result.curve)
    suggestion = {
        "method": method,
        "lr": lr,
        "suggestions": result.suggestions,
        "group_lrs": group_lrs(lr, finetune.lr_ratios),
        "lr_ratios": list(finetune.lr_ratios),
        "stopped_early": result.stopped_early,
        "iterations": iterations,
    }
    write_json(paths.out / "suggestion.json", suggestion)
    ran = {"device": str(runtime.device), "precision": runtime.precision}
    config = {"base": params.base, "model": params.model, "lr_find": params.lr_find}
    write_json(paths.out / "config.json", {**config, "finetune": finetune, "runtime": ran})
    others = ", ".join(f"{k} {v:.2e}" for k, v in sorted(result.suggestions.items()))
    stopped = " (stopped: loss diverged)" if result.stopped_early else ""
    print(f"lr_find: {iterations} iterations{stopped}; {method} suggests lr {lr:.2e} ({others})")
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("lr_find", lr_find, PATHS, setup=torch_stage, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
