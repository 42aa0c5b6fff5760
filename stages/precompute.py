"""precompute: pooled backbone features of every train and valid image, fingerprinted."""

from __future__ import annotations

from visiontune.data.manifest import read_classes
from visiontune.distributed import torch_stage
from visiontune.features import save_features
from visiontune.fileio import atomic_dir, write_json
from visiontune.precompute import precompute_features
from visiontune.stagekit import Stage, run_stage

PATHS = {
    "prepared": "fetch output (images, manifest)",
    "split": "split output (train.csv, valid.csv, classes.json)",
    "out": "feature cache folder",
}


def precompute(stage: Stage):
    params, paths = stage.params, stage.paths
    # Under torchrun the ranks share the images; rank 0 writes the cache.
    features, stats = precompute_features(
        params.model,
        params.base,
        params.precompute,
        train_csv=paths.split / "train.csv",
        valid_csv=paths.split / "valid.csv",
        classes=read_classes(paths.split / "classes.json"),
        image_root=paths.prepared,
        runtime_params=params.runtime,
        dist=stage.dist,
    )
    if not stage.is_main:
        return None
    config = {"base": params.base, "model": params.model, "precompute": params.precompute}
    with atomic_dir(paths.out) as tmp:
        save_features(tmp / "features.safetensors", features)
        write_json(tmp / "fingerprint.json", features.fingerprint)
        write_json(tmp / "throughput.json", stats)
        write_json(tmp / "config.json", config)
    print(
        f"precompute: {len(features.train_y)} train + {len(features.valid_y)} valid images, "
        f"{int(stats['feature_dim'])} features, {stats['images_per_s']:.1f} images/s "
        f"({features.fingerprint['precision']})"
    )
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("precompute", precompute, PATHS, setup=torch_stage, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
