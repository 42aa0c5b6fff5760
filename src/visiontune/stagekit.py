"""The one way a stage script runs: params, seed, runtime, torchrun, tracking, exit codes.

A stage script is its paths and a `work(stage)` function that reads inputs, calls the
library and writes outputs; `run_stage` does everything around it, in this order:

1. parse the paths (dvc.yaml passes each one, from its `vars`) and load the params; bad
   params exit 2 with the key and what it allows, before any work;
2. for torch stages, `setup` (`visiontune.distributed.torch_stage`): allocator settings,
   seeds, device and precision, and the torchrun process group (a bad launch exits 2);
3. open the tracking run on rank 0 (an unusable store exits 3 when `tracking.required`);
4. run `work`; a `StageError` (or a bad input: OSError, ValueError) prints
   "<stage> failed: why" and exits 1;
5. print what was written and log the output folder to MLflow (exit 1 if that fails and
   tracking is required).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visiontune import tracking
from visiontune.config import WEIGHT_SOURCES, Params, ParamsError, load_params
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
    # Finds the relative paths of params.yaml, in DVC's experiment copies too.
    locate: Locator
    # Torch stages: visiontune.runtime.Runtime and visiontune.distributed.DistContext (Any:
    # fetch and split must not import torch to start).
    runtime: Any = None
    dist: Any = None
    # Called once the outputs are logged (finetune drops its last checkpoint then).
    after_logging: list[Callable[[], None]] = field(default_factory=list)
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
    setup: Callable[[Params], AbstractContextManager[tuple[Any, Any]]] | None = None,
    track: bool = True,
    doc: str | None = None,
    argv: list[str] | None = None,
) -> int:
    """Run stage `name`: `work` returns its output folder (None on ranks > 0); the exit code.

    `paths` maps each path option (`out` → `--out`) to its help text; all are required.
    `setup` gives torch stages their (runtime, process group) for the duration of `work`.
    `track=False`: no tracking run (a stage that runs on every `dvc repro`).
    """
    parser = argparse.ArgumentParser(prog=f"stages/{name}.py", description=doc)
    parser.add_argument("--params", default="params.yaml", help="params file")
    for option, help_text in paths.items():
        parser.add_argument(f"--{option.replace('_', '-')}", type=Path, required=True,
                            help=help_text)  # fmt: skip
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return EXIT_BAD_PARAMS
    locate = Locator.for_stage(Path.cwd(), os.environ.get("DVC_ROOT"))
    if setup is not None:  # torch stages build the model: a weights file must be found
        try:
            params = _with_located_weights(params, locate)
        except FileNotFoundError as exc:
            print(exc, file=sys.stderr)
            return EXIT_BAD_PARAMS
    stage = Stage(name, params, args, tracking.NoTracking(name), locate)
    with contextlib.ExitStack() as stack:
        try:
            if setup is not None:
                stage.runtime, stage.dist = stack.enter_context(setup(params))
        except (RuntimeError, ValueError) as exc:  # no such device, a bad torchrun launch
            print(exc, file=sys.stderr)
            return EXIT_BAD_PARAMS
        try:
            if stage.is_main and track:
                stage.tracker = _open_tracking(stage)
            out = work(stage)
        except StageError as exc:
            print(f"{name} {exc.what}: {exc}", file=sys.stderr)
            return _fail(stage, exc.code)
        except (OSError, ValueError, KeyError) as exc:  # unreadable or inconsistent inputs
            print(f"{name} failed: {type(exc).__name__ if isinstance(exc, KeyError) else ''}"
                  f"{exc}", file=sys.stderr)  # fmt: skip
            return _fail(stage, EXIT_FAILED)
    if out is None:
        return 0
    print_outputs(name, out)
    manifest = (args.prepared if "prepared" in paths else out) / "manifest.csv"
    code = tracking.log_stage(
        stage.tracker, params, out, manifest=manifest, model=stage.register_model
    )
    if code == 0:
        for callback in stage.after_logging:
            callback()
    return code


def _with_located_weights(params: Params, locate: Locator) -> Params:
    """`params` with a relative `model.weights` file made absolute where `locate` finds it."""
    weights = params.model.weights
    if weights in WEIGHT_SOURCES:
        return params
    found = str(locate.locate(weights, "model.weights file").path)
    return params.model_copy(update={"model": params.model.model_copy(update={"weights": found})})


def _open_tracking(stage: Stage) -> tracking.StageTracker | tracking.NoTracking:
    runtime = stage.runtime
    tags = (
        {"device": str(runtime.device), "precision": runtime.precision}
        if runtime is not None
        else {"device": stage.params.base.device, "precision": stage.params.base.precision}
    )
    try:
        return tracking.preflight(stage.params, stage.name, environ=os.environ, runtime_tags=tags)
    except tracking.TrackingError as exc:
        print(exc, file=sys.stderr)
        raise StageError("no usable tracking store", EXIT_TRACKING_UNAVAILABLE) from None


def _fail(stage: Stage, code: int) -> int:
    # Ranks > 0 and disabled trackers have nothing to close.
    if stage.tracker.enabled:
        stage.tracker.end("FAILED")
    return code


def print_outputs(stage: str, out: str | Path) -> None:
    """Say where the stage's outputs are: its folder and what is in it (one line)."""
    out = Path(out)
    names = sorted(f"{p.name}/" if p.is_dir() else p.name for p in out.iterdir())
    print(f"{stage}: wrote {out}/: {', '.join(n for n in names if not n.startswith('.'))}")
