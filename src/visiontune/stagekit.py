"""What every stage script does before any work: validated params, a usable tracking store."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from visiontune import tracking
from visiontune.config import Params, ParamsError, load_params
from visiontune.runtime import configure_memory

# Exit codes of the stage scripts (0 is success, 1 a failure of the stage's own work).
EXIT_BAD_PARAMS = 2
EXIT_TRACKING_UNAVAILABLE = 3


class StageExit(Exception):
    """A stage must stop before doing any work; `code` is its exit status."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


def open_stage(
    stage: str, params_path: str | Path
) -> tuple[Params, tracking.StageTracker | tracking.TrackingAgent]:
    """Load and validate the params, and start opening the stage's tracking run.

    The run is opened by a helper process while the stage goes on (`TrackingAgent`): the
    stage calls `wait_for_tracking` before its long work or its first output, so an
    unusable store still stops it before anything that matters. Errors are printed (the
    key path and what is allowed, or why the store is unusable) and raised as StageExit
    with the exit code the script should return.
    """
    try:
        params = load_params(params_path)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        raise StageExit(EXIT_BAD_PARAMS) from None
    configure_memory(params.runtime)  # before any model or batch is allocated
    if launch_rank(os.environ) > 0:
        # Only rank 0 logs: the other ranks of a torchrun job get a disabled tracker.
        return params, tracking.StageTracker(stage, required=False)
    if not params.tracking.enabled:
        return params, tracking.StageTracker(stage, required=False)
    agent = tracking.TrackingAgent.start(
        params, stage, environ=os.environ, runtime_tags=tracking.runtime_tags_of(params)
    )
    return params, agent


def wait_for_tracking(tracker: tracking.StageTracker | tracking.TrackingAgent) -> int:
    """Wait until the stage's tracking run is open; the exit code to stop with, else 0.

    3 when the store is unusable and `tracking.required` (the reason is printed); an
    optional store only warns, and the stage goes on without tracking.
    """
    try:
        tracker.ready()
    except tracking.TrackingError as exc:
        print(exc, file=sys.stderr)
        return EXIT_TRACKING_UNAVAILABLE
    return 0


def print_outputs(stage: str, out: str | Path) -> None:
    """Say where the stage's outputs are: its folder and what is in it (one line)."""
    out = Path(out)
    names = sorted(f"{p.name}/" if p.is_dir() else p.name for p in out.iterdir())
    print(f"{stage}: wrote {out}/: {', '.join(n for n in names if not n.startswith('.'))}")


def launch_rank(environ: Mapping[str, str]) -> int:
    """The global rank torchrun gave this process (0 when not launched by it).

    Only rank 0 opens a tracking run; `visiontune.distributed.init_from_environ` joins the
    process group.
    """
    return int(environ.get("RANK", "0"))
