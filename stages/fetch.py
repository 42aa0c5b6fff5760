"""fetch: get the dataset named by `data.source`, check every image, write data/prepared/."""

from __future__ import annotations

import sys

from visiontune.cores import loader_workers
from visiontune.data.prepare import format_summary, prepare_dataset
from visiontune.fileio import atomic_dir, write_json
from visiontune.stagekit import Stage, run_stage

PATHS = {
    "out": "prepared dataset folder",
    "download_dir": "download cache and extraction scratch space (not a DVC output)",
}


def fetch(stage: Stage):
    params, paths, seed = stage.params, stage.paths, stage.params.base.seed
    # Downloads are kept in the repo DVC was run from: experiment copies share them.
    downloads = stage.locate.shared(paths.download_dir)
    workers, progress = loader_workers("auto"), sys.stderr.isatty()
    with atomic_dir(paths.out) as tmp:  # a bad source (OSError, ValueError) leaves nothing
        summary = prepare_dataset(
            params.data, tmp, downloads, stage.locate, seed=seed, workers=workers, progress=progress
        )
        config = {"data": params.data, "base": {"seed": seed}, "fetch": summary}
        write_json(tmp / "config.json", config)
    print(format_summary(summary, paths.out / "rejects.csv"))
    return paths.out


def main(argv: list[str] | None = None) -> int:
    return run_stage("fetch", fetch, PATHS, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
