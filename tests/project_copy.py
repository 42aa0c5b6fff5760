"""Throwaway copies of this repo for end-to-end runs: real `dvc repro` on shrunken real params."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
sys.path.insert(0, str(REPO_ROOT / "bench"))
import project as bench_project  # noqa: E402  (bench/project.py)
from project import deep_merge, free_port, pipeline_stages, stage_argv  # noqa: E402, F401

# The real params.yaml, shrunk: a few real photos per class, small images, one short cycle
# each, so the whole pipeline runs in a minute or two on two CPU cores. The data is the demo's:
# the shipped source URL, read from its shipped relative mirror, `../shared/data/dogscats`
# (make_project lays the copy out beside a `shared` link, as a clone of the repo sits).
SMALL_OVERRIDES: dict[str, Any] = {
    "data": {"max_per_class": 12},
    "model": {"image_size": 96},
    "precompute": {"batch_size": 16},
    "head": {"epochs": 3, "batch_size": 16},
    "lr_find": {"num_iter": 8, "batch_size": 8},
    "finetune": {"n_cycles": 2, "cycle_len": 1, "cycle_mult": 1, "batch_size": 8},
    "tta": {"n_augment": 2, "batch_size": 16},
    "report": {"top_losses": 4},
}


def make_project(dest: Path, overrides: Mapping[str, Any] | None = None) -> Path:
    """A copy of the repo at `dest` (bench/project.py), its params shrunk and `overrides`
    merged on top."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params = deep_merge(deep_merge(params, SMALL_OVERRIDES), overrides or {})
    return bench_project.make_project(dest, params)


def project_env(**extra: str) -> dict[str, str]:
    """Environment for stage subprocesses: this interpreter's venv first on PATH."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


def make_command(project: Path, *args: str) -> list[str]:
    """`make ARGS` as a user runs it, with this interpreter's venv as the Makefile's VENV.

    STAMP points at a fresh file beside the project, so `setup` is up to date and make
    never installs the project copy into the venv the tests run in.
    """
    stamp = project.parent / "venv-installed.stamp"
    stamp.touch()
    venv = Path(sys.executable).parent.parent
    return ["make", "-s", f"VENV={venv}", f"STAMP={stamp}", *args]


def _run_or_fail(command: list[str], project: Path, env, timeout: float, what: str):
    """Run `command` in `project`; fail the test with its output if it fails."""
    result = subprocess.run(
        command,
        cwd=project,
        env=dict(env or project_env()),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(
            f"{what} failed ({result.returncode}):\n"
            f"{result.stdout[-6000:]}\n{result.stderr[-6000:]}"
        )
    return result


def make(project: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 900):
    """Run a Makefile target in `project`; fail the test with its output if it fails."""
    command = make_command(project, *args)
    return _run_or_fail(command, project, env, timeout, f"make {' '.join(args)}")


def dvc(project: Path, *args: str, env: Mapping[str, str] | None = None, timeout: float = 600):
    """Run the venv's dvc in `project`; fail the test with its output if it fails."""
    command = [str(Path(sys.executable).parent / "dvc"), *args]
    return _run_or_fail(command, project, env, timeout, " ".join(command))
