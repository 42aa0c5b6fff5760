"""source_stamp: fingerprint the local files fetch reads (runs on every `dvc repro`, in ~1 s).

`fetch` depends on the stamp, so DVC re-runs it when a file under a local `data.source`
changes in place, and skips it when the stamp's bytes are unchanged. Not a `run_stage`
stage: it logs no tracking run, since a `dvc repro` with nothing changed must log nothing.
"""

from __future__ import annotations

import argparse
import sys

from visiontune.config import ParamsError, load_params
from visiontune.data.stamp import source_stamp
from visiontune.fileio import write_json
from visiontune.stagekit import EXIT_BAD_PARAMS


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--out", required=True, help="stamp file (dvc.yaml: paths.stamp)")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_PARAMS
    write_json(args.out, source_stamp(params.data))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
