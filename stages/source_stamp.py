"""source_stamp: fingerprint the local files fetch reads (runs on every `dvc repro`, in ~1 s).

`fetch` depends on the stamp, so DVC re-runs it when a file under a local `data.source`
changes in place, and skips it when the stamp's bytes are unchanged. It opens no tracking
run (`track=False`): a `dvc repro` with nothing changed must log nothing.
"""

from __future__ import annotations

from visiontune.data.stamp import source_stamp
from visiontune.fileio import write_json
from visiontune.stagekit import Stage, run_stage

PATHS = {"out": "stamp file"}


def stamp(stage: Stage) -> None:
    write_json(stage.paths.out, source_stamp(stage.params.data, stage.locate))


def main(argv: list[str] | None = None) -> int:
    return run_stage("source_stamp", stamp, PATHS, track=False, doc=__doc__, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
