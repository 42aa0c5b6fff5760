"""split: stratified, deterministic train/valid tables from the fetch manifest."""

from __future__ import annotations

from visiontune.data.manifest import SPLIT_COLUMNS, read_manifest, write_table
from visiontune.data.split import split_manifest
from visiontune.fileio import atomic_dir, write_json
from visiontune.stagekit import Stage, StageError, run_stage

PATHS = {"prepared": "fetch output folder", "out": "split output folder"}


def split(stage: Stage):
    params, paths = stage.params, stage.paths
    manifest = read_manifest(paths.prepared / "manifest.csv")
    result = split_manifest(manifest, params.split)
    if result.train.empty or result.valid.empty:
        raise StageError(
            f"{len(result.train)} train and {len(result.valid)} valid images ({len(manifest)} "
            f"in {paths.prepared / 'manifest.csv'}); both need at least one"
        )
    with atomic_dir(paths.out) as tmp:
        write_table(tmp / "train.csv", result.train, SPLIT_COLUMNS)
        write_table(tmp / "valid.csv", result.valid, SPLIT_COLUMNS)
        write_json(tmp / "classes.json", result.classes)  # sorted
        write_json(tmp / "report.json", result.report)
        write_json(tmp / "config.json", {"split": params.split})
    report = result.report
    print(
        f"split ({report['mode']}): {report['train']} train, {report['valid']} valid, "
        f"{report['classes']} classes, {report['test_held_out']} test held out"
    )
    if report["dropped_classes"]:
        minimum, dropped = report["min_per_class"], report["dropped_classes"]
        print(f"split: dropped classes with < {minimum} images: {dropped}")
    for warning in report["warnings"]:
        print(f"split: warning: {warning}")
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("split", split, PATHS, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
