"""fetch: get the dataset named by `data.source`, check every image, write data/prepared/."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from visiontune import tracking
from visiontune.data.archive import ArchiveError
from visiontune.data.download import DownloadError
from visiontune.data.prepare import format_summary, prepare_dataset
from visiontune.data.sources import SourceError
from visiontune.fileio import atomic_dir, save_config
from visiontune.stagekit import StageExit, open_stage, print_outputs, wait_for_tracking


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--out", default="data/prepared", help="prepared dataset folder")
    parser.add_argument(
        "--download-dir",
        default="data/downloads",
        help="download cache and extraction scratch space (not a DVC output)",
    )
    args = parser.parse_args(argv)
    try:
        # Params validated before any work; the tracking run opens alongside.
        params, tracker = open_stage("fetch", args.params)
    except StageExit as exc:
        return exc.code

    if code := wait_for_tracking(tracker):
        return code
    out = Path(args.out)
    try:
        with atomic_dir(out) as tmp:
            summary = prepare_dataset(
                params.data,
                tmp,
                Path(args.download_dir),
                seed=params.base.seed,
                workers=min(os.cpu_count() or 1, 8),
                progress=sys.stderr.isatty(),
            )
            save_config(
                tmp / "config.json",
                {"data": params.data, "base": {"seed": params.base.seed}, "fetch": summary},
            )
    except (SourceError, ArchiveError, DownloadError) as exc:
        print(f"fetch failed: {exc}", file=sys.stderr)
        return 1
    print(format_summary(summary, out / "rejects.csv"))
    print_outputs("fetch", out)
    # Tracking: mirror the written outputs into MLflow (exit 1 only if tracking.required).
    return tracking.log_stage(tracker, params, out, manifest=out / "manifest.csv")


if __name__ == "__main__":
    raise SystemExit(main())
