"""Run the real pipeline in a throwaway copy of this repo, each dvc.yaml stage command as its
own measured subprocess; DVC then records the outputs and must report them up to date."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MEASURE = Path(__file__).resolve().with_name("measure.py")
# What a copy leaves behind: the developer's own pipeline results; the copy starts clean.
NOT_COPIED = ("data/", "outputs/", "bench/results/", "dvc.lock", "mlflow.db", "mlruns/", ".gpu/")


def portable(value: Any) -> Any:
    """A results record whose paths name no machine's folders: relative to the repo."""
    if isinstance(value, dict):
        return {key: portable(item) for key, item in value.items()}
    if isinstance(value, list):
        return [portable(item) for item in value]
    if isinstance(value, str):
        return value.replace(f"{REPO_ROOT}/", "").replace(f"{REPO_ROOT.parent}/", "../")
    return value


def free_port() -> int:
    """A TCP port on the loopback that nothing listens on now (for a server to start on)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def deep_merge(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Nested dict merge: mappings merge key by key, anything else replaces."""
    merged = copy.deepcopy(dict(base))
    for key, value in overrides.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def git(*args: str, root: Path = REPO_ROOT) -> str:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit and dirtiness of the repo the benchmark copied (bench/results left out: a run
    of several datasets writes the first one's results before it copies the repo again)."""
    status = git("status", "--porcelain", "--", ".", ":(exclude)bench/results", root=root)
    return {"commit": git("rev-parse", "HEAD", root=root).strip(), "dirty": bool(status.strip())}


def make_project(dest: Path, params: Mapping[str, Any], root: Path = REPO_ROOT) -> Path:
    """Copy the files git sees in `root` to `dest` with `params` as its params.yaml, as a git
    repo. A `shared` link beside `dest` to the `shared/` beside `root` keeps the shipped
    relative paths (`../shared/data/dogscats`) meaning there what they mean here."""
    with contextlib.suppress(FileExistsError):
        dest.parent.mkdir(parents=True, exist_ok=True)
        (dest.parent / "shared").symlink_to(root.parent / "shared", target_is_directory=True)
    listed = git("ls-files", "--cached", "--others", "--exclude-standard", "-z", root=root)
    for name in listed.split("\0"):
        if name and not name.startswith(NOT_COPIED) and (root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run(["git", "add", "-A"], cwd=dest, check=True)
    subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com",
                    "commit", "-qm", "project copy"], cwd=dest, check=True)  # fmt: skip
    return dest


def project_env(project: Path) -> dict[str, str]:
    """Stage environment: this venv first on PATH, the copy's own `src` first on sys.path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(project / "src"), env.get("PYTHONPATH")]))
    # Stages must log to the copy's own store and group under one pipeline run; nothing
    # inherited from a surrounding dvc/mlflow session may point them back at the repo.
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(name, None)
    env["VISIONTUNE_PIPELINE_ID"] = f"bench:{project}:{time.time():.0f}"
    return env


@dataclass
class StageRun:  # what one command cost
    name: str
    command: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float  # the largest single process of the stage's tree
    returncode: int
    log: str = field(repr=False, default="")

    def to_dict(self) -> dict[str, Any]:
        return {key: value for key, value in asdict(self).items() if key != "log"}


def run_measured(
    name: str, command: str | Sequence[str], cwd: Path, env: Mapping[str, str], log_path: Path
) -> StageRun:
    """Run one command (a string: through the shell) under bench/measure.py, which reports
    the rusage of exactly this command and the children it waited for."""
    text = command if isinstance(command, str) else shlex.join(command)
    words = [text] if isinstance(command, str) else list(command)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    (usage_path := log_path.with_suffix(".rusage.json")).unlink(missing_ok=True)
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        returncode = subprocess.run(
            [sys.executable, str(MEASURE), str(usage_path), "--", *words],
            cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT,
        ).returncode  # fmt: skip
        wall = time.perf_counter() - start
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else {}
    return StageRun(name, text, wall, usage.get("cpu_s", float("nan")),
                    usage.get("peak_rss_mb", float("nan")), usage.get("returncode", returncode),
                    log_path.read_text(errors="replace"))  # fmt: skip


def pipeline_stages(project: Path) -> list[tuple[str, str, Path]]:
    """(name, command, working dir) of each dvc.yaml stage, in dvc.yaml's order (which a test
    keeps a valid pipeline order), with `${section.key}` templating resolved as DVC does."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    for entry in spec.get("vars") or []:  # dvc.yaml's own `vars`: the stages' paths
        params = {**params, **entry}

    def value(match: re.Match[str]) -> str:
        node: Any = params
        for part in match.group(1).split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(f"dvc.yaml refers to ${{{match.group(1)}}}, not in params.yaml")
            node = node[part]
        return str(node)

    return [
        (name, re.sub(r"\$\{\s*([\w.-]+)\s*\}", value, stage["cmd"]),
         project / stage.get("wdir", "."))
        for name, stage in spec["stages"].items()
    ]  # fmt: skip


def stage_argv(stage: str, project: Path = REPO_ROOT, **paths: str | Path) -> list[str]:
    """The arguments dvc.yaml gives `stages/<stage>.py`, for `main(argv)` or a subprocess;
    keywords replace options (`params="bad.yaml"`, `lr_find=...` for `--lr-find`)."""
    for name, command, _ in pipeline_stages(project):
        if name == stage:
            words = shlex.split(command)
            argv = words[words.index(f"stages/{stage}.py") + 1 :]
            options = dict(zip(argv[::2], argv[1::2], strict=True))
            for key, value in paths.items():
                options[f"--{key.replace('_', '-')}"] = str(value)
            return [word for pair in options.items() for word in pair]
    raise KeyError(f"dvc.yaml has no stage {stage!r}")


def run_pipeline(
    project: Path,
    echo: bool = True,
    around: Callable[[str, str], None] | None = None,
    only: Collection[str] | None = None,
    commit: bool = True,
) -> list[StageRun]:
    """Run each stage's command as DVC would, in order, with this interpreter; stop at the
    first failure; then `dvc commit` + `dvc status` (a pseudo-stage `dvc`) unless `commit` is
    False (a machine without DVC). `around(stage, "before" | "after")` runs next to each
    stage, outside its timing; `only` runs just those stages."""
    env, logs = project_env(project), project / "bench-logs"
    runs: list[StageRun] = []
    for name, command, wdir in pipeline_stages(project):
        if only is not None and name not in only:
            continue
        command = re.sub(r"^python\b", shlex.quote(sys.executable), command)
        if around:
            around(name, "before")
        runs.append(run := run_measured(name, command, wdir, env, logs / f"{name}.log"))
        if echo:
            print(f"  {name:<11} {run.wall_s:8.1f} s  peak RSS {run.peak_rss_mb:7.0f} MiB"
                  f"  rc={run.returncode}", flush=True)  # fmt: skip
        if run.returncode != 0:
            print(run.log[-4000:], file=sys.stderr)
            return runs
        if around:
            around(name, "after")
    if commit:
        dvc = shlex.quote(str(Path(sys.executable).parent / "dvc"))
        targets = "".join(f" {shlex.quote(run.name)}" for run in runs) if only else ""
        script = f"{dvc} commit -f -q{targets} && {dvc} status{targets}"
        runs.append(run_measured("dvc", script, project, env, logs / "dvc.log"))
        if echo:
            print(f"  dvc commit  {runs[-1].wall_s:8.1f} s  rc={runs[-1].returncode}", flush=True)
    return runs
