"""split: stratified, deterministic train/valid tables from the fetch manifest."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from visiontune import tracking
from visiontune.data.manifest import SPLIT_COLUMNS, read_manifest, write_classes, write_table
from visiontune.data.split import split_manifest
from visiontune.fileio import atomic_dir, save_config, write_json
from visiontune.stagekit import StageExit, open_stage, print_outputs, wait_for_tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--prepared", default="data/prepared", help="fetch output folder")
    parser.add_argument("--out", default="data/split", help="split output folder")
    args = parser.parse_args(argv)
    try:
        # Params validated before any work; the tracking run opens alongside.
        params, tracker = open_stage("split", args.params)
    except StageExit as exc:
        return exc.code

    manifest_path = Path(args.prepared) / "manifest.csv"
    try:
        manifest = read_manifest(manifest_path)
    except (OSError, ValueError) as exc:
        print(f"split failed: cannot read {manifest_path}: {exc}", file=sys.stderr)
        return 1
    split = split_manifest(manifest, params.split)
    if split.train.empty or split.valid.empty:
        print(
            f"split failed: {len(split.train)} train and {len(split.valid)} valid images "
            f"({len(manifest)} in {manifest_path}); both need at least one",
            file=sys.stderr,
        )
        return 1

    if code := wait_for_tracking(tracker):
        return code
    with atomic_dir(args.out) as tmp:
        write_table(tmp / "train.csv", split.train, SPLIT_COLUMNS)
        write_table(tmp / "valid.csv", split.valid, SPLIT_COLUMNS)
        write_classes(tmp / "classes.json", split.classes)
        write_json(tmp / "report.json", split.report)
        save_config(tmp / "config.json", {"split": params.split})
    report = split.report
    print(
        f"split ({report['mode']}): {report['train']} train, {report['valid']} valid, "
        f"{report['classes']} classes, {report['test_held_out']} test held out"
    )
    if report["dropped_classes"]:
        print(
            f"split: dropped classes with < {report['min_per_class']} images: "
            f"{report['dropped_classes']}"
        )
    for warning in report["warnings"]:
        print(f"split: warning: {warning}")
    print_outputs("split", args.out)
    # Tracking: mirror the written outputs into MLflow (exit 1 only if tracking.required).
    return tracking.log_stage(
        tracker, params, args.out, manifest=Path(args.prepared) / "manifest.csv"
    )


if __name__ == "__main__":
    raise SystemExit(main())
