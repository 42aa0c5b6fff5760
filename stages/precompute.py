"""precompute: pooled backbone features of every train and valid image, fingerprinted."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from visiontune import distributed, tracking
from visiontune.data.images import UnreadableImageError
from visiontune.data.manifest import read_classes
from visiontune.features import save_features
from visiontune.fileio import atomic_dir, save_config, write_json
from visiontune.models.weights import WeightsError
from visiontune.precompute import precompute_features
from visiontune.runtime import resolve_runtime
from visiontune.stagekit import StageExit, open_stage, print_outputs, wait_for_tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument(
        "--prepared", default="data/prepared", help="fetch output (images, classes)"
    )
    parser.add_argument("--split", default="data/split", help="split output (train.csv, valid.csv)")
    parser.add_argument("--out", default="outputs/features", help="feature cache folder")
    args = parser.parse_args(argv)
    try:
        # Params validated before any work; the tracking run opens alongside.
        params, tracker = open_stage("precompute", args.params)
    except StageExit as exc:
        return exc.code
    try:
        # Under torchrun: join the process group; the ranks share the images.
        device_type = resolve_runtime(params.base).device.type
        dist = distributed.init_from_environ(params.distributed, device_type, os.environ)
    except (distributed.DistributedSetupError, RuntimeError) as exc:
        print(exc, file=sys.stderr)
        return 2
    try:
        return _run(args, params, tracker, dist)
    finally:
        distributed.cleanup(dist)


def _run(args, params, tracker, dist) -> int:
    prepared, split, out = Path(args.prepared), Path(args.split), Path(args.out)
    if code := wait_for_tracking(tracker):
        return code
    try:
        features, stats = precompute_features(
            params.model,
            params.base,
            params.precompute,
            train_csv=split / "train.csv",
            valid_csv=split / "valid.csv",
            classes=read_classes(split / "classes.json"),
            image_root=prepared,
            dist=dist,
        )
    except (WeightsError, UnreadableImageError, ValueError, FileNotFoundError) as exc:
        print(f"precompute failed: {exc}", file=sys.stderr)
        return 1
    if not dist.is_main:
        return 0  # rank 0 writes the cache and logs it
    with atomic_dir(out) as tmp:
        save_features(tmp / "features.safetensors", features)
        write_json(tmp / "fingerprint.json", features.fingerprint)
        write_json(tmp / "throughput.json", stats)
        save_config(
            tmp / "config.json",
            {"base": params.base, "model": params.model, "precompute": params.precompute},
        )
    line = (
        f"precompute: {len(features.train_y)} train + {len(features.valid_y)} valid images, "
        f"{int(stats['feature_dim'])} features, {stats['images_per_s']:.1f} images/s "
        f"({features.fingerprint['precision']})"
    )
    print(line)
    print_outputs("precompute", out)
    # Tracking: mirror the written outputs into MLflow (exit 1 only if tracking.required).
    return tracking.log_stage(tracker, params, out, manifest=prepared / "manifest.csv")


if __name__ == "__main__":
    raise SystemExit(main())
