"""Run the real pipeline in a throwaway copy of this repo and measure every stage.

Each stage's command (from dvc.yaml) runs as its own subprocess, so its wall time and peak
RSS are its own; DVC then records the outputs (`dvc commit`) and must report them up to date.
"""

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
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
MEASURE = Path(__file__).resolve().with_name("measure.py")


def portable(value: Any) -> Any:
    """Paths in a results record relative to the repo (`.venv/...`, `../shared/...`), so the
    committed record names no machine's directories."""
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


# What a copy leaves behind: the developer's own pipeline results; the copy starts clean.
NOT_COPIED = ("data/", "outputs/", "bench/results/", "bench/.venv", "dvc.lock", "mlflow.db",
              "mlruns/", ".gpu/")  # fmt: skip


def repo_files(root: Path = REPO_ROOT) -> list[str]:
    """The files git sees in the working tree (tracked + untracked, not ignored) that a
    project copy takes."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=root,
        check=True,
        capture_output=True,
    ).stdout.decode()
    return [name for name in listed.split("\0") if name and not name.startswith(NOT_COPIED)]


def git_state(root: Path = REPO_ROOT) -> dict[str, Any]:
    """Commit and dirtiness of the repo the benchmark copied, for the record."""

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False
        ).stdout.strip()

    # bench/results left out: a run of several datasets writes the first one's results
    # there before it copies the repo for the next.
    status = git("status", "--porcelain", "--", ".", ":(exclude)bench/results")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(status)}


def make_project(dest: Path, params: Mapping[str, Any], root: Path = REPO_ROOT) -> Path:
    """Copy the repo's files to `dest` with `params` as its params.yaml, as a git repo.

    `dest` gets a `shared` link beside it, to the `shared/` beside this repo, so that the
    shipped relative paths (`../shared/data/dogscats`) mean there what they mean here.
    """
    with contextlib.suppress(FileExistsError):
        dest.parent.mkdir(parents=True, exist_ok=True)
        (dest.parent / "shared").symlink_to(root.parent / "shared", target_is_directory=True)
    for name in repo_files(root):
        if (root / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / name, dest / name)
    (dest / "params.yaml").write_text(yaml.safe_dump(dict(params), sort_keys=False))
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run(["git", "init", "-q", "-b", "main"], cwd=dest, check=True)
    subprocess.run([*git, "add", "-A"], cwd=dest, check=True)
    subprocess.run([*git, "commit", "-qm", "project copy"], cwd=dest, check=True)
    return dest


def project_env(project: Path) -> dict[str, str]:
    """Stage environment: this venv first on PATH, the copy's own `src` first on sys.path."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(project / "src"), env.get("PYTHONPATH", "")) if p
    )
    # Stages must log to the copy's own store and group under one pipeline run; nothing
    # inherited from a surrounding dvc/mlflow session may point them back at the repo.
    for name in ("MLFLOW_TRACKING_URI", "DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV"):
        env.pop(name, None)
    env["VISIONTUNE_PIPELINE_ID"] = f"bench:{project}:{time.time():.0f}"
    return env


@dataclass
class StageRun:
    """What one stage cost: wall time, CPU time, peak memory, exit status."""

    name: str
    command: str
    wall_s: float
    cpu_s: float
    peak_rss_mb: float  # largest single process (ru_maxrss of the stage and its children)
    peak_tree_rss_mb: float  # sampled sum over the process tree (counts shared pages twice)
    returncode: int
    log: str = field(repr=False, default="")

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("log")
        return data


def _sample_tree_rss(pid: int, stop: threading.Event, peak: list[float]) -> None:
    try:
        root = psutil.Process(pid)
    except psutil.NoSuchProcess:
        return
    while not stop.is_set():
        total = 0
        try:
            for proc in [root, *root.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    total += proc.memory_info().rss
        except psutil.Error:
            break
        peak[0] = max(peak[0], total / 2**20)
        stop.wait(0.25)


def run_measured(
    name: str, command: str | Sequence[str], cwd: Path, env: Mapping[str, str], log_path: Path
) -> StageRun:
    """Run one command, measuring wall time, CPU time and peak RSS of it alone.

    The command runs under bench/measure.py, a small launcher that reports the rusage of
    exactly this command and the children it waited for (see its docstring for why the
    launcher is needed); a sampler adds the peak summed RSS of the whole process tree.
    """
    shell = isinstance(command, str)
    text = command if shell else shlex.join(command)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    usage_path = log_path.with_suffix(".rusage.json")
    usage_path.unlink(missing_ok=True)
    launcher = [sys.executable, str(MEASURE), str(usage_path), "--"]
    launcher += [text] if shell else list(command)
    with open(log_path, "wb") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(
            launcher, cwd=cwd, env=dict(env), stdout=log, stderr=subprocess.STDOUT
        )
        stop, peak = threading.Event(), [0.0]
        sampler = threading.Thread(target=_sample_tree_rss, args=(proc.pid, stop, peak))
        sampler.start()
        returncode = proc.wait()
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
    usage = json.loads(usage_path.read_text()) if usage_path.exists() else {}
    return StageRun(
        name=name,
        command=text,
        wall_s=wall,
        cpu_s=usage.get("cpu_s", float("nan")),
        peak_rss_mb=usage.get("peak_rss_mb", float("nan")),
        peak_tree_rss_mb=peak[0],
        returncode=usage.get("returncode", returncode),
        log=log_path.read_text(errors="replace"),
    )


def resolve_templating(text: str, params: Mapping[str, Any]) -> str:
    """Substitute dvc.yaml's `${section.key}` references with params.yaml values, as DVC does
    (e.g. `${distributed.launcher} stages/finetune.py`)."""

    def value(match: re.Match[str]) -> str:
        node: Any = params
        for part in match.group(1).split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise KeyError(f"dvc.yaml refers to ${{{match.group(1)}}}, not in params.yaml")
            node = node[part]
        return str(node)

    return re.sub(r"\$\{\s*([\w.-]+)\s*\}", value, text)


def pipeline_stages(project: Path) -> list[tuple[str, str, Path]]:
    """(name, command, working dir) of each dvc.yaml stage, in dvc.yaml's order (which a
    test keeps a valid pipeline order)."""
    spec = yaml.safe_load((project / "dvc.yaml").read_text())
    params = yaml.safe_load((project / "params.yaml").read_text())
    # dvc.yaml's own `vars` (the stages' paths) resolve like params.yaml's values.
    for entry in spec.get("vars") or []:
        params = {**params, **entry}
    return [
        (name, resolve_templating(stage["cmd"], params), project / stage.get("wdir", "."))
        for name, stage in spec["stages"].items()
    ]


def stage_argv(stage: str, project: Path = REPO_ROOT, **paths: str | Path) -> list[str]:
    """The arguments dvc.yaml gives `stages/<stage>.py`, for `main(argv)` or a subprocess.

    Its `vars` paths are resolved; keywords replace options (`params="bad.yaml"`,
    `out=tmp / "o"`, `lr_find=...` for `--lr-find`).
    """
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
    runner: str = "script",
    echo: bool = True,
    around: Callable[[str, str], None] | None = None,
    only: Collection[str] | None = None,
    commit: bool = True,
) -> list[StageRun]:
    """Run every stage in order (stop at the first failure), then let DVC record outputs.

    runner "script": each stage's cmd as DVC would run it, then `dvc commit` + `dvc status`
    (timed as a pseudo-stage `dvc`); runner "dvc": `dvc repro -s <stage>` per stage.
    `around(stage, "before" | "after")` is called next to each stage, outside its timing.
    `only`: run just these stages (the rest of the pipeline must not be needed by them).
    `commit=False`: no DVC afterwards (a machine without it). Stage commands run with this
    interpreter.
    """
    env = project_env(project)
    dvc = str(Path(sys.executable).parent / "dvc")
    logs = project / "bench-logs"
    runs: list[StageRun] = []
    for name, cmd, wdir in pipeline_stages(project):
        if only is not None and name not in only:
            continue
        cmd = re.sub(r"^python\b", shlex.quote(sys.executable), cmd)
        command: str | list[str] = cmd if runner == "script" else [dvc, "repro", "-s", name]
        if around:
            around(name, "before")
        run = run_measured(
            name, command, wdir if runner == "script" else project, env, logs / f"{name}.log"
        )
        runs.append(run)
        if around and run.returncode == 0:
            around(name, "after")
        if echo:
            print(
                f"  {name:<11} {run.wall_s:8.1f} s  peak RSS {run.peak_rss_mb:7.0f} MiB"
                f"  rc={run.returncode}",
                flush=True,
            )
        if run.returncode != 0:
            print(run.log[-4000:], file=sys.stderr)
            return runs
    if runner == "script" and commit:
        targets = "".join(f" {shlex.quote(run.name)}" for run in runs) if only is not None else ""
        script = f"{shlex.quote(dvc)} commit -f -q{targets} && {shlex.quote(dvc)} status{targets}"
        run = run_measured("dvc", script, project, env, logs / "dvc.log")
        runs.append(run)
        if echo:
            print(f"  {'dvc commit':<11} {run.wall_s:8.1f} s  rc={run.returncode}", flush=True)
    return runs
