"""The one way a stage script runs: params, seed, runtime, torchrun, tracking, exit codes.

A stage script is its paths and a `work(stage)` that reads inputs, calls the library and
writes outputs. Exit codes: 2 for bad params or a launch they cannot serve (before any
work), 3 for an unusable tracking store when `tracking.required`, 1 for a `StageError` or a
bad input (OSError, ValueError, KeyError) and for a failed logging of the outputs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from visiontune import tracking
from visiontune.config import WEIGHT_SOURCES, Params, load_params
from visiontune.locations import Locator

EXIT_FAILED = 1
EXIT_BAD_PARAMS = 2
EXIT_TRACKING_UNAVAILABLE = 3


class StageError(Exception):
    """The stage stops: the message says why, `code` is the exit status, `what` happened."""

    def __init__(self, message: str, code: int = EXIT_FAILED, what: str = "failed") -> None:
        super().__init__(message)
        self.code = code
        self.what = what


@dataclass
class Stage:
    """What `work` gets: the params, its paths, and (torch stages) runtime and process group."""

    name: str
    params: Params
    paths: argparse.Namespace
    tracker: tracking.StageTracker | tracking.NoTracking
    locate: Locator  # finds the relative paths of params.yaml, in DVC's experiment copies too
    # visiontune.runtime.Runtime and visiontune.distributed.DistContext: Any, so that fetch
    # and split start without importing torch.
    runtime: Any = None
    dist: Any = None
    # Called once the outputs are logged (finetune drops its last checkpoint then).
    after_logging: Callable[[], None] | None = None
    # A model file to log and register (evaluate's: it records how to predict).
    register_model: Path | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0 (or no torchrun): the process that writes outputs and logs them."""
        return self.dist is None or self.dist.is_main


def run_stage(
    name: str,
    work: Callable[[Stage], Path | None],
    paths: Mapping[str, str],
    *,
    setup: Callable[[Params], contextlib.AbstractContextManager[tuple[Any, Any]]] | None = None,
    track: bool = True,
    doc: str | None = None,
    argv: list[str] | None = None,
) -> int:
    """Run stage `name`: `work` returns its output folder (None on ranks > 0); the exit code.

    `paths` maps each required path option (`out` → `--out`) to its help text. `setup` gives
    torch stages their (runtime, process group) while `work` runs. `track=False`: no tracking
    run (a stage that runs on every `dvc repro`).
    """
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=doc)
    parser.add_argument("--params", default="params.yaml", help="params file")
    for option, text in paths.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=Path, required=True, help=text)
    args = parser.parse_args(argv)
    locate = Locator.for_stage(Path.cwd(), os.environ.get("DVC_ROOT"))
    with contextlib.ExitStack() as stack:
        try:  # bad params, no weights file, no such device, a launch the params cannot serve
            stage = Stage(name, load_params(args.params), args, tracking.NoTracking(name), locate)
            if setup is not None:  # torch stages build the model: a weights file must be found
                stage.params = _with_located_weights(stage.params, locate)
                stage.runtime, stage.dist = stack.enter_context(setup(stage.params))
        except (FileNotFoundError, RuntimeError, ValueError) as exc:  # ParamsError too
            print(exc, file=sys.stderr)
            return EXIT_BAD_PARAMS
        # A tracker that opened no run (NoTracking) ends as a no-op.
        try:
            if stage.is_main and track:
                stage.tracker = _open_tracking(stage)
            out = work(stage)
        except (StageError, OSError, ValueError, KeyError) as exc:
            # Unreadable or inconsistent inputs fail as a StageError would; a KeyError says so.
            kind = type(exc).__name__ if isinstance(exc, KeyError) else ""
            failure = exc if isinstance(exc, StageError) else StageError(f"{kind}{exc}")
            print(f"{name} {failure.what}: {failure}", file=sys.stderr)
            stage.tracker.end("FAILED")
            return failure.code
    if out is None:
        return 0
    names = sorted(f"{p.name}/" if p.is_dir() else p.name for p in out.iterdir())
    print(f"{name}: wrote {out}/: {', '.join(n for n in names if not n.startswith('.'))}")
    manifest = (args.prepared if "prepared" in paths else out) / "manifest.csv"
    code = tracking.log_stage(
        stage.tracker, stage.params, out, manifest=manifest, model=stage.register_model
    )
    if code == 0 and stage.after_logging is not None:
        stage.after_logging()
    return code


def _with_located_weights(params: Params, locate: Locator) -> Params:
    """`params` with a relative `model.weights` file made absolute where `locate` finds it."""
    weights = params.model.weights
    if weights in WEIGHT_SOURCES:
        return params
    found = str(locate.locate(weights, "model.weights file").path)
    return params.model_copy(update={"model": params.model.model_copy(update={"weights": found})})


def _open_tracking(stage: Stage) -> tracking.StageTracker | tracking.NoTracking:
    # The device and precision a torch stage resolved, else those params.yaml asks for.
    ran = stage.params.base if stage.runtime is None else stage.runtime
    tags = {"device": str(ran.device), "precision": ran.precision}
    try:
        return tracking.preflight(stage.params, stage.name, environ=os.environ, runtime_tags=tags)
    except tracking.TrackingError as exc:
        print(exc, file=sys.stderr)
        raise StageError("no usable tracking store", EXIT_TRACKING_UNAVAILABLE) from None
