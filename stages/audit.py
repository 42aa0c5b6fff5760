"""audit: suspect labels, near-duplicates and outliers, from the cached features.

It needs only fetch, split and precompute, so run it before a first full run (`dvc repro
audit`); it changes nothing: act on its findings with data.exclude and data.relabel.
"""

from __future__ import annotations

import numpy as np

from visiontune.audit import AuditImages, audit_features
from visiontune.audit.report import headline, write_audit
from visiontune.data.manifest import (
    DUPLICATE_OF,
    IMAGES_DIR,
    REJECT_COLUMNS,
    SPLIT_COLUMNS,
    read_manifest,
    read_table,
)
from visiontune.distributed import torch_stage
from visiontune.features import load_current_features
from visiontune.fileio import write_json
from visiontune.stagekit import Stage, run_stage

PATHS = {
    "prepared": "fetch output folder (manifest.csv and the images)",
    "split": "split output (train.csv, valid.csv, classes.json)",
    "features": "feature cache folder",
    "out": "output folder",
}


def audit(stage: Stage):
    params, paths = stage.params, stage.paths
    features = load_current_features(paths.features, paths.split, params.model, params.base)
    manifest = read_manifest(paths.prepared / "manifest.csv")
    ids = dict(zip(manifest["path"], manifest["sha256"], strict=True))
    train, valid = (read_table(paths.split / f"{p}.csv", SPLIT_COLUMNS) for p in ("train", "valid"))
    rows = [*train["path"], *valid["path"]]
    images = AuditImages(
        paths=[path.removeprefix(f"{IMAGES_DIR}/") for path in rows],
        labels=np.concatenate([features.train_y.numpy(), features.valid_y.numpy()]),
        splits=["train"] * len(train) + ["valid"] * len(valid),
        ids=[ids[path] for path in rows],
        n_train=len(train),
    )
    # Of byte-identical files fetch kept one: the others are duplicates the user should see.
    rejects = read_table(paths.prepared / "rejects.csv", REJECT_COLUMNS)
    copies = rejects[rejects["reason"].str.startswith(DUPLICATE_OF)]
    dropped = [(reason.removeprefix(DUPLICATE_OF), path) for path, reason in copies.values]
    train_x, valid_x = features.train_x.float().numpy(), features.valid_x.float().numpy()
    seed = params.base.seed
    result = audit_features(train_x, valid_x, images, features.classes, params.audit, seed, dropped)
    image_root = paths.prepared / IMAGES_DIR
    write_audit(paths.out, result.findings, result.metrics, image_root, params.audit.show)
    write_json(paths.out / "config.json", {"audit": params.audit, "base": {"seed": seed}})
    print(f"audit: {headline(result.metrics)}; see {paths.out / 'findings.csv'}")
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("audit", audit, PATHS, setup=torch_stage, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
