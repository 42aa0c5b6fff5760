"""train_head: fit the classifier head on the cached features (fastai's precompute=True)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visiontune import tracking
from visiontune.data.manifest import read_classes
from visiontune.features import StaleCacheError, expected_inputs, load_features
from visiontune.fileio import save_config, write_csv, write_json
from visiontune.models.weights import WeightsError
from visiontune.stagekit import StageExit, open_stage, print_outputs, wait_for_tracking
from visiontune.train.head import save_head
from visiontune.train.head_choice import head_metadata, train_head_on_features


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument(
        "--split", default="data/split", help="split output (train/valid.csv, classes.json)"
    )
    parser.add_argument("--features", default="outputs/features", help="feature cache folder")
    parser.add_argument("--out", default="outputs/head", help="output folder")
    args = parser.parse_args(argv)
    try:
        # Params validated before any work; the tracking run opens alongside.
        params, tracker = open_stage("train_head", args.params)
    except StageExit as exc:
        return exc.code

    split, out = Path(args.split), Path(args.out)
    try:
        # Recomputed from the current params and data: a stale cache is refused.
        where = (params.model, params.base, split / "train.csv", split / "valid.csv")
        classes = read_classes(split / "classes.json")
        expected = expected_inputs(*where, classes)
        if expected is None:  # hub weights: identified by loading them (timm)
            from visiontune.precompute import expected_fingerprint

            expected = expected_fingerprint(*where, classes)
        features = load_features(Path(args.features) / "features.safetensors", expected)
        # The backbone's own classifier, cached by precompute, seeds the head (head.init).
        source = None if params.head.init == "random" else features.source
        result = train_head_on_features(features, params.head, params.base.seed, source)
    except (StaleCacheError, WeightsError, OSError, ValueError) as exc:
        print(f"train_head failed: {exc}", file=sys.stderr)
        return 1

    if code := wait_for_tracking(tracker):
        return code
    meta = head_metadata(features, params.head, result)
    save_head(out / "head.safetensors", result.head, meta)
    write_csv(out / "history.csv", result.history)
    metrics = dict(result.metrics)
    if result.lr_find is not None:  # head.lr: auto
        metrics["lr_suggestions"] = result.lr_find.suggestions
    write_json(out / "metrics.json", metrics)
    save_config(out / "config.json", {"base": params.base, "head": params.head})
    m = result.metrics
    how = (
        f"logistic regression (C {m['logreg_C']:.2g})"
        if m["init"] == "logreg"
        else f"{m['init']} init + {m['epochs']} epochs at lr {m['lr']:.2e}"
    )
    print(
        f"train_head: {how} on {m['n_train']} features: valid_acc {m['valid_acc']:.4f} "
        f"(loss {m['valid_loss']:.4f}); {m['init_reason']}; {m['domain']} domain"
    )
    print_outputs("train_head", out)
    # Tracking: mirror the written outputs into MLflow (exit 1 only if tracking.required).
    return tracking.log_stage(tracker, params, out)


if __name__ == "__main__":
    raise SystemExit(main())
