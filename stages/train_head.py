"""train_head: fit the classifier head on the cached features (fastai's precompute=True)."""

from __future__ import annotations

from visiontune.distributed import torch_stage
from visiontune.features import load_current_features
from visiontune.fileio import write_csv, write_json
from visiontune.stagekit import Stage, run_stage
from visiontune.train.head import save_head
from visiontune.train.head_choice import describe, head_record, train_head_on_features

PATHS = {
    "split": "split output (train.csv, valid.csv, classes.json)",
    "features": "feature cache folder",
    "out": "output folder",
}


def train_head(stage: Stage):
    params, paths = stage.params, stage.paths
    # A cache computed from other params or data is refused (StaleCacheError).
    features = load_current_features(paths.features, paths.split, params.model, params.base)
    # The backbone's own classifier, cached by precompute, may seed the head (head.init).
    source = None if params.head.init == "random" else features.source
    result = train_head_on_features(features, params.head, params.base.seed, source)
    out = paths.out
    # The model's record starts here: finetune and evaluate complete it.
    save_head(out / "head.safetensors", result.head, head_record(features, params.head, result))
    write_csv(out / "history.csv", result.history)
    metrics = dict(result.metrics)
    if result.lr_find is not None:  # head.lr: auto
        metrics["lr_suggestions"] = result.lr_find.suggestions
    write_json(out / "metrics.json", metrics)
    write_json(out / "config.json", {"base": params.base, "head": params.head})
    print(f"train_head: {describe(result.metrics)}")
    return out


def main(argv: list[str] | None = None) -> int:
    return run_stage("train_head", train_head, PATHS, setup=torch_stage, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
