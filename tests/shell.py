"""A user's shell for the walkthrough tests: runs the pages' commands as written, remembers them.

Each command runs in `bash -c`, in an environment that starts as a new login shell's would
(the venv is not on PATH); `source FILE` changes that environment as it would a shell's.
Servers (`make ui`, `mlflow server`, `mlflow models serve`) run in the background until
their block ends. `substitutions` replace what a test machine lacks (a port, a mount) in the
text before it runs; the command is recorded as the page shows it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
import requests
from doc_pages import normalize
from project_copy import make_project


def new_login_env(venv_bin: Path, **extra: str) -> dict[str, str]:
    """The environment of a new shell: this process's, without the venv or a tracking URI."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "MLFLOW_TRACKING_URI")}
    parts = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(p for p in parts if p and Path(p) != venv_bin)
    env.update(extra)
    return env


class Shell:
    def __init__(self, cwd: Path, env: dict[str, str], substitutions: Mapping[str, str]) -> None:
        self.cwd = cwd
        self.env = env
        self.substitutions = dict(substitutions)
        self.ran: set[str] = set()
        self.took: list[tuple[str, float]] = []  # (line, seconds), for `pytest --durations`

    def _text(self, line: str) -> str:
        for old, new in self.substitutions.items():
            line = line.replace(old, new)
        return line

    def run(self, line: str, *, cwd: Path | None = None, timeout: float = 600, check=True,
            stdin: str = ""):  # fmt: skip
        """Run one shown line, `stdin` typed at it; fail the test with its output if it fails."""
        text = self._text(line)
        started = time.monotonic()
        if text.startswith("source "):
            text = f"{text} && env -0"
        # Files, not pipes: a command that leaves a process behind (`dvc queue start` starts
        # its workers) must not keep the call waiting for the pipe to close.
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            code = subprocess.run(["bash", "-c", text], cwd=cwd or self.cwd, env=self.env,
                                  input=stdin, text=True, stdout=out, stderr=err,
                                  timeout=timeout).returncode  # fmt: skip
            out.seek(0)
            err.seek(0)
            result = subprocess.CompletedProcess(text, code, out.read(), err.read())
        if check and result.returncode != 0:
            pytest.fail(f"`{line}` failed ({result.returncode}):\n{result.stdout[-5000:]}\n"
                        f"{result.stderr[-5000:]}")  # fmt: skip
        self.took.append((line, time.monotonic() - started))
        print(f"{self.took[-1][1]:6.1f}s  {line}", file=sys.stderr)
        if line.startswith("source "):
            self.env = dict(item.split("=", 1) for item in result.stdout.split("\0") if item)
        self.ran.update(normalize(line))
        return result

    @contextlib.contextmanager
    def serve(self, line: str, url: str, log: Path, health: str = "/health") -> Iterator[str]:
        """Run a server line in the background until the block ends; yield `url` once it
        answers `health`, and the server's output so far as `log`'s text afterwards."""
        with open(log, "w") as out:
            process = subprocess.Popen(
                ["bash", "-c", self._text(line)], cwd=self.cwd, env=self.env, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
            try:
                deadline = time.monotonic() + 120
                while True:
                    with contextlib.suppress(requests.RequestException):
                        if requests.get(url + health, timeout=2).status_code == 200:
                            break
                    if process.poll() is not None or time.monotonic() > deadline:
                        pytest.fail(f"`{line}` did not start serving:\n{log.read_text()[-4000:]}")
                    time.sleep(0.5)
                self.ran.update(normalize(line))
                yield url
            finally:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait(timeout=10)


def user_project(root: Path, overrides: Mapping[str, Any]) -> Shell:
    """A user's clone in `root`/project (beside `root`/shared, so the shipped relative mirror
    resolves), `params.yaml` shrunk by `overrides`, `.venv` the environment CI installed, and
    a new shell there whose PATH lacks the venv until a page's `source .venv/bin/activate`.
    `make demo`'s install step is up to date: CI ran `make setup`."""
    venv_bin = Path(sys.executable).parent
    project = make_project(root / "project", overrides)
    (project / ".venv").symlink_to(venv_bin.parent, target_is_directory=True)
    stamp = root / "installed.stamp"
    stamp.touch()
    author = {f"GIT_{who}_{what}": value for who in ("AUTHOR", "COMMITTER")
              for what, value in (("NAME", "Ada"), ("EMAIL", "ada@example.com"))}  # fmt: skip
    return Shell(project, new_login_env(venv_bin, MAKEFLAGS=f"STAMP={stamp}", **author), {})
