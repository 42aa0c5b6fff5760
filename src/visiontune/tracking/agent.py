"""A stage's MLflow tracking in a helper process, so that opening the store overlaps the work.

Opening the store takes ~3 s before a stage logs anything: importing mlflow and its
SQLAlchemy store, then finding or creating the pipeline's parent run and the stage's run.
In the stage's own process that came on top of its imports, its model build and its work:
train_head, whose training takes half a second, ran ~7 s. The helper does the same
`preflight` and, later, the same `log_stage`, in a process of its own started by
`open_stage`, so on 2 cores the two start-ups run side by side.

The stage calls `ready()` before its long work or its first output (the store is still
checked before any work that matters) and `log()` once its outputs are written. If the
stage exits without logging, crashed or was killed, the helper sees its pipe close and
marks both runs FAILED, so no run is left RUNNING.

Protocol: one JSON object a line. Stage → helper: the opening request, then the log
request. Helper → stage: the preflight status, then the log's exit code.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

from visiontune.config import Params, parse_params
from visiontune.tracking.store import (
    TrackingError,
    TrackingUnavailableError,
    logging_failed,
    redact,
)

# How long a stage waits at exit for the helper to close its runs.
_CLOSE_TIMEOUT_S = 60.0
# The helper's command line. Not `python -m visiontune.tracking.agent`: runpy imports the
# package first, whose __init__ imports this module, then runs it a second time as __main__
# and warns about it ("found in sys.modules ... prior to execution") on every stage.
_HELPER = "from visiontune.tracking.agent import main; raise SystemExit(main())"


class TrackingAgent:
    """The stage's side: a handle on the helper process that does the tracking."""

    def __init__(self, stage: str, process: subprocess.Popen, *, required: bool) -> None:
        self.stage = stage
        self.required = required
        self._process = process
        self._status: dict[str, Any] | None = None
        atexit.register(self.close)

    @classmethod
    def start(
        cls,
        params: Params,
        stage: str,
        *,
        environ: Mapping[str, str],
        runtime_tags: Mapping[str, str],
        cwd: Path | None = None,
    ) -> TrackingAgent:
        """Start the helper; it opens `stage`'s run while the caller goes on."""
        cwd = Path.cwd() if cwd is None else cwd
        process = subprocess.Popen(
            [sys.executable, "-c", _HELPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=dict(environ),
            cwd=cwd,
            text=True,
        )
        opening = {
            "stage": stage,
            "params": params.model_dump(mode="json"),
            "pid": os.getpid(),
            "cwd": str(cwd),
            "runtime_tags": dict(runtime_tags),
        }
        # A helper that died at start closes its pipe: `ready()` then reports its exit code.
        with contextlib.suppress(BrokenPipeError):
            _send(process.stdin, opening)
        return cls(stage, process, required=params.tracking.required)

    @property
    def enabled(self) -> bool:
        """False once the helper reported tracking off (an unusable optional store)."""
        return self._status is None or self._status["status"] == "ready"

    def ready(self) -> None:
        """Wait for the run to be open; raise TrackingUnavailableError if the store is not
        usable and tracking is required (the helper has already warned otherwise)."""
        if self._status is None:
            self._status = _receive(self._process.stdout) or {
                "status": "unavailable",
                "message": (
                    f"the tracking helper exited with code {self._process.wait()} "
                    "before opening the run (its error is printed above)"
                ),
            }
        if self._status["status"] == "unavailable" and self.required:
            raise TrackingUnavailableError(self._status["message"])

    def log(
        self,
        out_dir: str | Path,
        *,
        metrics: Mapping[str, float] | None,
        manifest: Path,
    ) -> int:
        """Have the helper log the stage's outputs and close its run; its exit code."""
        try:
            self.ready()
        except TrackingError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        if not self.enabled:
            return 0
        request = {
            "out_dir": str(out_dir),
            "metrics": dict(metrics or {}),  # non-numbers are skipped by the helper
            "manifest": str(manifest),
        }
        try:
            _send(self._process.stdin, request)
            reply = _receive(self._process.stdout)
        except OSError:  # the helper died: its pipe is gone
            reply = None
        self.close()
        if reply is not None:
            return int(reply["code"])
        reason = f"the tracking helper exited with code {self._process.returncode}"
        return logging_failed(self.stage, reason, out_dir, required=self.required)

    def close(self) -> None:
        """Let the helper finish (runs not logged are marked FAILED) and wait for it."""
        if self._process.poll() is not None:
            return
        if self._process.stdin is not None and not self._process.stdin.closed:
            with contextlib.suppress(OSError):  # the helper is gone already
                self._process.stdin.close()
        try:
            self._process.wait(timeout=_CLOSE_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def _send(stream: IO[str] | None, message: Mapping[str, Any]) -> None:
    assert stream is not None
    stream.write(json.dumps(message, default=float) + "\n")  # NumPy scalars too
    stream.flush()


def _receive(stream: IO[str] | None) -> dict[str, Any] | None:
    assert stream is not None
    line = stream.readline()
    return json.loads(line) if line else None


# -- the helper's side -------------------------------------------------------------------


def serve(requests: IO[str], replies: IO[str], environ: Mapping[str, str]) -> int:
    """Open the stage's run, report, then log the outputs when asked (or end the runs
    FAILED when the stage goes away without asking)."""
    from visiontune.tracking import log_stage, preflight

    opening = _receive(requests)
    if opening is None:  # the stage exited before sending anything
        return 0
    params = parse_params(opening["params"])
    stage = opening["stage"]
    try:
        tracker = preflight(
            params,
            stage,
            environ=environ,
            cwd=Path(opening["cwd"]),
            pid=int(opening["pid"]),
            runtime_tags=opening["runtime_tags"],
        )
    except TrackingUnavailableError as exc:
        _send(replies, {"status": "unavailable", "message": str(exc)})
        return 0
    except Exception as exc:  # preflight turns store errors into the one above; this is a bug
        _send(
            replies,
            {"status": "unavailable", "message": redact(f"{type(exc).__name__}: {exc}")},
        )
        return 1
    _send(replies, {"status": "ready" if tracker.enabled else "disabled"})
    if not tracker.enabled:
        return 0
    request = _receive(requests)
    if request is None:  # the stage failed, crashed or was killed before logging
        tracker.end("FAILED")
        return 0
    code = log_stage(
        tracker,
        params,
        Path(request["out_dir"]),
        metrics=request["metrics"] or None,
        manifest=Path(request["manifest"]),
    )
    _send(replies, {"code": code})
    return 0


def main() -> int:
    # The protocol owns the real stdout; anything else printed goes to stderr.
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    # Ctrl-C reaches the whole process group. Interrupts are the stage's to handle: the
    # helper ends its runs when the stage's pipe closes, not half-way through a write.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    return serve(sys.stdin, replies, os.environ)
