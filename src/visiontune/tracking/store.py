"""Where tracking data goes and which pipeline execution a stage belongs to: relative stores
resolve against the ORIGINAL repo (`dvc exp run --temp/--queue` run stages in a copy without
git-ignored files), and one `dvc` process is one pipeline execution."""

from __future__ import annotations

import contextlib
import os
import re
import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import psutil
from filelock import FileLock

from visiontune.config import TrackingParams

# The user-info part (`user:password@`) of any URI in a value.
_USERINFO = re.compile(r"(?<=://)[^/@\s]+@")


def redact(value: str) -> str:
    """`value` with URI credentials replaced by `***@`: params like `data.source` and
    `tracking.uri` may carry them, and they are never logged or printed as they are."""
    return _USERINFO.sub("***@", value)


class TrackingError(RuntimeError):
    """Tracking cannot be set up or a logging call failed."""


class TrackingUnavailableError(TrackingError):
    """The tracking store cannot be reached or written."""


@dataclass(frozen=True)
class Store:
    """An MLflow URI plus where new experiments keep artifacts (None: a server decides)."""

    uri: str
    artifact_location: str | None

    @property
    def is_server(self) -> bool:
        return self.uri.startswith(("http://", "https://"))


def git(cwd: Path, *args: str) -> str | None:
    """The output of `git args` in `cwd`; None when git fails or is missing."""
    try:
        done = subprocess.run(
            ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=20
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def repo_root(environ: Mapping[str, str], cwd: Path) -> Path:
    """The original repo: `DVC_ROOT` (which `exp run --temp/--queue` set to it), else the git
    top level around `cwd`, else `cwd`."""
    if environ.get("DVC_ROOT"):
        return Path(environ["DVC_ROOT"]).resolve()
    top = git(cwd, "rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else cwd.resolve()


def git_state(cwd: Path) -> tuple[str | None, bool | None]:
    """(commit SHA, dirty) of the checkout at `cwd`; (None, None) outside git. Dirty ignores
    untracked files (DVC outputs, scratch) and dvc.lock, which records results, not inputs."""
    commit = git(cwd, "rev-parse", "HEAD")
    status = git(cwd, "status", "--porcelain", "--untracked-files=no", "--", ".", ":!dvc.lock")
    if commit is None or status is None:
        return None, None
    return commit, bool(status)


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
    """Fail within `timeout_s` when a server is down or a local store is not writable
    (MLflow's own client retries a dead server for minutes)."""
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


def _check_writable(folder: Path, what: str) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise TrackingUnavailableError(f"cannot create {what} {folder}: {exc}") from None
    if not os.access(folder, os.W_OK):
        raise TrackingUnavailableError(f"{what} {folder} is not writable")


def first_use_lock(store: Store) -> contextlib.AbstractContextManager[object]:
    """A lock held while opening a SQLite store: MLflow creates and migrates a new database
    without one, and two processes doing it at once fail ("duplicate column name")."""
    if not store.uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    return FileLock(f"{store.uri.removeprefix('sqlite:///')}.lock")


def _is_dvc(process: psutil.Process) -> bool:
    try:
        argv = process.cmdline()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False
    # `dvc ...`, `python .venv/bin/dvc ...` or `python -m dvc ...`
    return any(
        Path(arg).name == "dvc" or argv[index : index + 2] == ["-m", "dvc"]
        for index, arg in enumerate(argv[:3])
    )


def pipeline_id(environ: Mapping[str, str], pid: int) -> str:
    """A key shared by every stage of one pipeline execution: `VISIONTUNE_PIPELINE_ID` when
    set (other launchers); else the nearest `dvc` ancestor of process `pid` (each `dvc repro`,
    and each queued `dvc exp exec-run`, is one process); else the process itself, so a stage
    run by hand is its own pipeline."""
    if environ.get("VISIONTUNE_PIPELINE_ID"):
        return environ["VISIONTUNE_PIPELINE_ID"]
    process = psutil.Process(pid)
    owner = next((p for p in process.parents() if _is_dvc(p)), process)
    kind = "process" if owner is process else "dvc"
    return f"{kind}:{socket.gethostname()}:{owner.pid}:{owner.create_time():.3f}"
