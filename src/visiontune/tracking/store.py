"""Where tracking data goes and which pipeline execution a stage belongs to.

Relative stores resolve against the ORIGINAL repo (DVC runs `exp run --temp/--queue` stages
in a throwaway copy without git-ignored files), and a pipeline execution is keyed by the
`dvc` process that launched the stage, so one `dvc repro` gives one parent run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from filelock import FileLock

from visiontune.config import TrackingParams

PIPELINE_ID_ENV = "VISIONTUNE_PIPELINE_ID"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# DVC sets DVC_ROOT for every stage; `exp run --temp/--queue` set it to the original repo.
DVC_ROOT_ENV = "DVC_ROOT"
DVC_EXP_NAME_ENV = "DVC_EXP_NAME"
# `scheme://user:password@host`: the user-info part of any URI in a value.
logger = logging.getLogger("visiontune.tracking")
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value: str) -> str:
    """`value` with the credentials of any URI in it (`user:password@`) replaced by `***@`.

    Params like `data.source` and `tracking.uri` may carry credentials; they are never
    logged to MLflow or printed as they are.
    """
    return _USERINFO.sub("***@", value)


class TrackingError(RuntimeError):
    """Tracking cannot be set up or a logging call failed."""


class TrackingUnavailableError(TrackingError):
    """The tracking store cannot be reached or written."""


def logging_failed(stage: str, reason: str, out_dir: str | Path, *, required: bool) -> int:
    """Say that logging `stage` failed (its outputs are kept); the stage's exit code.

    1 with `tracking.required` (DVC then does not record the stage, so the next `dvc repro`
    reruns and re-logs it), else 0 after a warning.
    """
    message = (
        f"logging stage {stage!r} to MLflow failed: {reason}. "
        f"Its outputs in {out_dir} are complete and kept."
    )
    if required:
        print(f"error: {message} (tracking.required is true)", file=sys.stderr)
        return 1
    logger.warning("%s (tracking.required is false: continuing)", message)
    return 0


@dataclass(frozen=True)
class Store:
    """A resolved tracking store: an MLflow URI plus where new experiments keep artifacts.

    `artifact_location` is None for tracking servers, which decide it themselves.
    """

    uri: str
    artifact_location: str | None

    @property
    def is_server(self) -> bool:
        return self.uri.startswith(("http://", "https://"))


def repo_root(environ: Mapping[str, str], cwd: Path) -> Path:
    """The original repo: DVC's `DVC_ROOT`, else the git top level around `cwd`, else `cwd`."""
    if environ.get(DVC_ROOT_ENV):
        return Path(environ[DVC_ROOT_ENV]).resolve()
    try:
        top = subprocess.run(
            ["git", "rev-parse", "--show-toplevel"],
            cwd=cwd,
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return cwd.resolve()
    return Path(top).resolve() if top else cwd.resolve()


def _absolute(path: str, root: Path) -> Path:
    candidate = Path(path).expanduser()
    return candidate if candidate.is_absolute() else (root / candidate).resolve()


def resolve_uri(uri: str, root: Path) -> str:
    """Make a local store URI absolute (`sqlite:///x.db`, `file:x`, plain paths); keep others."""
    if uri.startswith("sqlite:///"):
        path = uri.removeprefix("sqlite:///")
        if path in ("", ":memory:"):
            return uri
        # sqlite:////abs.db has an absolute path after the third slash.
        return f"sqlite:///{_absolute(path, root)}"
    if uri.startswith("file:"):
        return _absolute(uri.removeprefix("file:").removeprefix("//"), root).as_uri()
    if "://" not in uri and ":" not in uri.split("/")[0]:
        return _absolute(uri, root).as_uri()
    return uri


def resolve_store(params: TrackingParams, root: Path, env_uri: str | None = None) -> Store:
    """Resolve the tracking section (URI overridden by `env_uri` when given) against `root`."""
    uri = resolve_uri(env_uri or params.uri, root)
    if uri.startswith(("http://", "https://", "databricks")):
        return Store(uri=uri.rstrip("/"), artifact_location=None)
    return Store(uri=uri, artifact_location=_absolute(params.artifact_location, root).as_uri())


def check_reachable(store: Store, timeout_s: float) -> None:
    """Fail fast (within `timeout_s`) when a server is down or a local store is not writable.

    MLflow's own client retries a dead server for minutes; this answers in seconds.
    """
    if store.is_server:
        import requests

        try:
            response = requests.get(f"{store.uri}/health", timeout=timeout_s)
        except requests.RequestException as exc:
            raise TrackingUnavailableError(
                f"MLflow tracking server {store.uri} is unreachable: {exc}"
            ) from None
        if response.status_code != 200:
            raise TrackingUnavailableError(
                f"MLflow tracking server {store.uri} is unhealthy: "
                f"HTTP {response.status_code} from /health"
            )
        return
    if store.uri.startswith("sqlite:///"):
        db = Path(store.uri.removeprefix("sqlite:///"))
        _check_writable(db.parent, f"tracking database folder for {store.uri}")
        if db.exists() and not os.access(db, os.R_OK | os.W_OK):
            raise TrackingUnavailableError(f"tracking database {db} is not readable and writable")
    if store.artifact_location and store.artifact_location.startswith("file:"):
        folder = Path(store.artifact_location.removeprefix("file://"))
        _check_writable(folder, "artifact location")


def first_use_lock(store: Store) -> contextlib.AbstractContextManager[object]:
    """A lock held while a process first opens a SQLite store, which creates its tables.

    MLflow creates and migrates a new SQLite database on first use without a lock; two
    processes doing it at once fail ("duplicate column name", "table already exists").
    Servers and other databases need none: a no-op then.
    """
    if not store.uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(f"{store.uri.removeprefix('sqlite:///')}.lock")


def _check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingUnavailableError(f"cannot create {what} {folder}: {exc}") from None
    if not os.access(folder, os.W_OK):
        raise TrackingUnavailableError(f"{what} {folder} is not writable")


def _is_dvc(process: psutil.Process) -> bool:
    try:
        argv = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    # `dvc ...`, `python .venv/bin/dvc ...` or `python -m dvc ...`
    for index, arg in enumerate(argv[:3]):
        if Path(arg).name == "dvc" or (arg == "-m" and argv[index + 1 : index + 2] == ["dvc"]):
            return True
    return False


def pipeline_id(environ: Mapping[str, str], pid: int) -> str:
    """A key shared by every stage of one pipeline execution.

    `VISIONTUNE_PIPELINE_ID` when set (other launchers); else the nearest `dvc` ancestor of
    process `pid` (each `dvc repro`, and each queued `dvc exp exec-run`, is one process);
    else the process itself, so a stage run by hand is its own pipeline.
    """
    if environ.get(PIPELINE_ID_ENV):
        return environ[PIPELINE_ID_ENV]
    process = psutil.Process(pid)
    owner = process
    for ancestor in process.parents():
        if _is_dvc(ancestor):
            owner = ancestor
            break
    kind = "process" if owner is process else "dvc"
    return f"{kind}:{socket.gethostname()}:{owner.pid}:{owner.create_time():.3f}"


def git_remote_url(root: Path) -> str | None:
    """The URL of the `origin` remote of the repo at `root`; None without one."""
    try:
        return subprocess.run(
            ["git", "remote", "get-url", "origin"],
            cwd=root, capture_output=True, text=True, check=True, timeout=20,
        ).stdout.strip() or None  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None


def git_state(cwd: Path) -> tuple[str | None, bool | None]:
    """(commit SHA, dirty) of the checkout at `cwd`; (None, None) outside git.

    Dirty ignores untracked files and dvc.lock: DVC outputs are git-ignored, scratch files
    are not part of the code that ran, and dvc.lock records results, not inputs.
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=20
        ).stdout.strip()

    try:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock"))
    except (OSError, subprocess.SubprocessError):
        return None, None
    return commit, dirty
