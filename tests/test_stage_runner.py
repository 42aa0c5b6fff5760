"""The stage runner against a real MLflow SQLite store: a stage logs, fails, crashes or is
killed, and its runs say so; epochs reach MLflow while the stage runs; a stage killed by
SIGKILL under `dvc repro` leaves no run RUNNING past the next stage's start."""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import signal
import socketserver
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from project_copy import REPO_ROOT, deep_merge, free_port, make_project, project_env, stage_argv

from visiontune.tracking.orphans import PID_TAG

# A stage as stages/ write them. `action`: log (the normal end), fail (StageError), crash
# (a bug), kill (SIGKILL); `epochs` are logged live, each after the test says "go".
STAGE = textwrap.dedent("""\
    import json, os, sys, time
    from pathlib import Path
    from visiontune.stagekit import StageError, run_stage

    action, epochs = sys.argv[1], int(sys.argv[2])

    def work(stage):
        out = stage.paths.out
        out.mkdir(parents=True, exist_ok=True)
        history = []
        for epoch in range(epochs):
            row = {"epoch": epoch, "valid_acc": 0.5 + epoch / 10, "valid_loss": 1.0 - epoch / 10}
            stage.tracker.log_epoch(row)
            history.append(row)
            print(json.dumps({"epoch": epoch, "pid": os.getpid()}), flush=True)
            while not (out / f"go{epoch}").exists():
                time.sleep(0.05)
        (out / "metrics.json").write_text(json.dumps({"valid_acc": 0.75, "epochs": epochs}))
        (out / "history.csv").write_text(
            "epoch,valid_acc,valid_loss\\n"
            + "".join(f"{r['epoch']},{r['valid_acc']},{r['valid_loss']}\\n" for r in history)
        )
        print(json.dumps({"pid": os.getpid()}), flush=True)
        if action == "fail":
            raise StageError("the inputs are wrong")
        if action == "crash":
            raise RuntimeError("the stage broke")
        if action == "kill":
            os.kill(os.getpid(), 9)
        return out

    raise SystemExit(run_stage("train_head", work, {"out": "output folder"}, argv=sys.argv[3:]))
    """)


def store(tmp_path: Path) -> dict:
    return {
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "artifact_location": str(tmp_path / "mlruns"),
        "experiment": "runner",
    }


def start_stage(tmp_path: Path, action: str, tracking: dict, epochs: int = 0) -> subprocess.Popen:
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump(deep_merge(params, {"tracking": tracking}))
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW"))}
    argv = ["--params", "params.yaml", "--out", str(tmp_path / "out")]
    return subprocess.Popen(
        [sys.executable, "-c", STAGE, action, str(epochs), *argv],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env,
    )  # fmt: skip


def run_stage(tmp_path: Path, action: str, tracking: dict) -> subprocess.CompletedProcess:
    process = start_stage(tmp_path, action, tracking)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def runs(tmp_path: Path) -> dict[str, object]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("runner")
    found = client.search_runs([experiment.experiment_id])
    return {"train_head" if r.info.run_name == "train_head" else "parent": r for r in found}


@pytest.mark.slow
def test_epochs_reach_mlflow_while_the_stage_runs_and_are_logged_once(tmp_path: Path) -> None:
    process = start_stage(tmp_path, "log", store(tmp_path), epochs=2)
    for epoch in range(2):
        line = process.stdout.readline()  # the stage logged epoch `epoch` and waits
        assert line, process.communicate(timeout=60)[1]
        # Only now: a client creating the database while the stage does would race it.
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
        run = runs(tmp_path)["train_head"]
        assert run.info.status == "RUNNING"
        history = client.get_metric_history(run.info.run_id, "valid/acc")
        assert [m.step for m in history] == list(range(epoch + 1))
        (tmp_path / "out" / f"go{epoch}").touch()
    assert process.wait(timeout=120) == 0, process.stderr.read()
    run = runs(tmp_path)["train_head"]
    assert run.info.status == "FINISHED"
    # history.csv holds the same two epochs: none is logged twice.
    history = client.get_metric_history(run.info.run_id, "valid/acc")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.5), (1, 0.6)]
    assert run.data.metrics["head/valid_acc"] == 0.75
    assert run.data.tags["visiontune.host"] and run.data.tags["visiontune.pid"]


@pytest.mark.slow
@pytest.mark.parametrize("action", ["fail", "crash"])
def test_a_stage_that_fails_or_crashes_leaves_failed_runs(tmp_path: Path, action) -> None:
    result = run_stage(tmp_path, action, store(tmp_path))
    assert result.returncode == 1, result.stderr
    if action == "fail":
        assert "train_head failed: the inputs are wrong" in result.stderr
    found = runs(tmp_path)
    assert found["train_head"].info.status == found["parent"].info.status == "FAILED"
    assert "head/valid_acc" not in found["train_head"].data.metrics


@pytest.mark.slow
def test_a_killed_stage_is_closed_by_the_next_stage_start(tmp_path: Path) -> None:
    killed = run_stage(tmp_path, "kill", store(tmp_path))
    assert killed.returncode == -signal.SIGKILL
    found = runs(tmp_path)
    assert found["train_head"].info.status == found["parent"].info.status == "RUNNING"
    # Runs of another host are never touched, even when their pid is gone here.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    other = client.create_run(
        found["parent"].info.experiment_id,
        tags={"visiontune.host": "elsewhere", "visiontune.pid": str(killed_pid(killed))},
    )
    assert run_stage(tmp_path, "log", store(tmp_path)).returncode == 0
    statuses = {
        r.info.run_id: r.info.status for r in client.search_runs([other.info.experiment_id])
    }
    assert statuses[found["train_head"].info.run_id] == "KILLED"
    assert statuses[found["parent"].info.run_id] == "KILLED"
    assert statuses[other.info.run_id] == "RUNNING"


def killed_pid(result: subprocess.CompletedProcess) -> int:
    return json.loads(result.stdout.splitlines()[-1])["pid"]


@pytest.mark.slow
def test_an_unusable_store_stops_the_stage_or_only_warns(tmp_path: Path) -> None:
    server = {**store(tmp_path), "uri": f"http://127.0.0.1:{free_port()}"}
    required = run_stage(tmp_path, "log", server)
    assert required.returncode == 3
    assert "unreachable" in required.stderr and "tracking.required: false" in required.stderr
    assert not (tmp_path / "out").exists()  # stopped before any output

    optional = run_stage(tmp_path, "log", {**server, "required": False})
    assert optional.returncode == 0, optional.stderr
    assert "continuing without tracking" in optional.stderr
    assert (tmp_path / "out" / "metrics.json").is_file()


class _Stall(http.server.BaseHTTPRequestHandler):
    """A download that never comes: the fetch stage waits on it until it is killed."""

    def do_GET(self) -> None:
        time.sleep(60)

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_sigkill_under_dvc_repro_then_any_stage_start_leaves_no_run_running(
    tmp_path: Path,
) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Stall)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/photos.zip"
    project = make_project(tmp_path / "p", {"data": {"source": url, "download_timeout_s": 60}})
    database = project / "mlflow.db"
    env = project_env()
    repro = subprocess.Popen(["dvc", "repro", "fetch"], cwd=project, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while _running_stage_runs(database) < 2:  # the pipeline run and the stage's
            assert time.monotonic() < deadline and repro.poll() is None, "fetch never opened a run"
            time.sleep(0.2)
        # Kill the process that holds the runs open, as the OOM killer would. Not the first
        # child of dvc whose command names fetch.py: under SHELL=/bin/sh (dash, no exec of
        # the last command) that is the shell, and the stage itself would live on.
        psutil.Process(_run_holder(database)).send_signal(signal.SIGKILL)
        assert repro.wait(timeout=60) != 0
    finally:
        repro.kill()
        server.shutdown()
    client = MlflowClient(tracking_uri=f"sqlite:///{database}")
    assert _running_stage_runs(database)  # nothing could close them yet
    # Any stage's start closes them, even one that then fails on its inputs.
    command = [sys.executable, "stages/split.py", *stage_argv("split", project)]
    split = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True,
                           timeout=120)  # fmt: skip
    assert split.returncode == 1 and "split failed" in split.stderr
    assert not _running_stage_runs(database)
    statuses = sorted(r.info.status for r in client.search_runs(_experiments(client)))
    assert statuses.count("KILLED") == 2  # the fetch run and its pipeline's parent


def _experiments(client: MlflowClient) -> list[str]:
    return [e.experiment_id for e in client.search_experiments()]


def _run_holder(database: Path) -> int:
    """The pid every RUNNING run names as the process holding it open."""
    with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
        pids = db.execute(
            "select distinct t.value from tags t join runs r on r.run_uuid = t.run_uuid "
            f"where r.status = 'RUNNING' and t.key = '{PID_TAG}'"
        ).fetchall()
    assert len(pids) == 1, pids
    return int(pids[0][0])


def _running_stage_runs(database: Path) -> int:
    """RUNNING runs, read with sqlite3: an MLflow client would race the stage's set-up."""
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as db:
            return db.execute("select count(*) from runs where status = 'RUNNING'").fetchone()[0]
    except sqlite3.Error:  # not created yet
        return 0


def test_dvc_passes_every_path_from_one_place() -> None:
    """Each stage script's paths come from dvc.yaml's `vars`, none is written in a script."""
    spec = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())
    for name, stage in spec["stages"].items():
        script = (REPO_ROOT / "stages" / f"{name}.py").read_text()
        for literal in ('"data/', '"outputs/'):
            assert literal not in script, (name, literal)
        assert "${paths." in stage["cmd"], name


def test_a_stage_with_tracking_off_runs_where_mlflow_is_not_installed(tmp_path: Path) -> None:
    """The GPU check's machine has no MLflow: with `tracking.enabled: false` a stage never
    imports it (here it cannot: `import mlflow` raises)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    disabled = deep_merge(params, {"tracking": {"enabled": False}})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(disabled))
    script = "import sys\nsys.modules['mlflow'] = None  # as if not installed\n" + STAGE
    argv = ["log", "0", "--params", "params.yaml", "--out", str(tmp_path / "out")]
    done = subprocess.run([sys.executable, "-c", script, *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text())["valid_acc"] == 0.75
