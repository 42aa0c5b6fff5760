"""Team setup, end to end on this machine: a DVC remote (a local folder standing in for
S3/GCS/Azure) and an `mlflow server` with a SQL backend and its own artifact store, shared
by two clones of the project — results move with `dvc push`/`dvc pull`, runs are seen by both.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient
from project_copy import dvc, free_port, make_project, project_env

pytestmark = pytest.mark.slow

OVERRIDES = {
    "runtime": {"num_workers": 0},
    "data": {"max_per_class": 6},
    "model": {"image_size": 64},
    "head": {"epochs": 1},
    "lr_find": {"num_iter": 6, "batch_size": 4},
    "tracking": {"experiment": "team", "registered_model": None},
}
GIT = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]


def git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [*GIT, *args], cwd=repo, check=True, capture_output=True, text=True
    ).stdout


def _stage_runs(client: MlflowClient) -> dict[str, int]:
    experiment = client.get_experiment_by_name("team")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    counts: dict[str, int] = {}
    for run in runs:
        if run.data.tags.get("visiontune.role") != "pipeline":
            counts[run.info.run_name] = counts.get(run.info.run_name, 0) + 1
    return counts


@pytest.fixture
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on SQLite and a local artifact folder, until the test ends."""
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
        "--port", str(port), "--workers", "1", "--backend-store-uri",
        f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    log = open(root / "server.log", "w")  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                               start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
        log.close()


def test_two_clones_share_data_and_runs(server: str, tmp_path: Path) -> None:
    remote = tmp_path / "dvc-remote"
    alice = make_project(tmp_path / "alice", OVERRIDES)
    env = project_env(MLFLOW_TRACKING_URI=server)
    dvc(alice, "remote", "add", "--default", "team", str(remote), env=env)
    dvc(alice, "repro", "train_head", env=env)
    dvc(alice, "push", env=env)
    git(alice, "add", "-A")
    git(alice, "commit", "-qm", "features and head, pushed to the team remote")

    bob = tmp_path / "bob"
    subprocess.run([*GIT, "clone", "-q", str(alice), str(bob)], check=True)
    # Only what has been run so far: a plain `dvc pull` would also ask for later stages.
    dvc(bob, "pull", "--with-deps", "train_head", env=env)
    # Bob has Alice's results byte for byte and nothing to recompute.
    for rel in ("outputs/features/features.safetensors", "outputs/head/head.safetensors"):
        assert (bob / rel).read_bytes() == (alice / rel).read_bytes(), rel
    status = json.loads(dvc(bob, "status", "train_head", "--json", env=env).stdout)
    assert status == {}
    client = MlflowClient(tracking_uri=server)
    assert _stage_runs(client) == {"fetch": 1, "split": 1, "precompute": 1, "train_head": 1}

    # Bob runs the next stage and shares it; Alice pulls it and sees his run too.
    dvc(bob, "repro", "lr_find", env=env)
    dvc(bob, "push", env=env)
    git(bob, "add", "-A")
    git(bob, "commit", "-qm", "lr_find")
    git(alice, "pull", "-q", str(bob), "main")
    dvc(alice, "pull", "--with-deps", "lr_find", env=env)
    # lr_find's outputs are small `cache: false` files: they travel in git, its inputs via DVC.
    bob_curve = (bob / "outputs/lr_find/curve.csv").read_bytes()
    assert (alice / "outputs/lr_find/curve.csv").read_bytes() == bob_curve
    # source_stamp is always listed: it re-checks the source on every `dvc repro`.
    assert json.loads(dvc(alice, "status", "--json", env=env).stdout).keys() <= {
        "source_stamp",
        "finetune",
        "evaluate",
        "report",
        "predict_test",
    }
    assert _stage_runs(MlflowClient(tracking_uri=server))["lr_find"] == 1
    # The artifacts went to the server's artifact store, not into either clone.
    assert not (alice / "mlruns").exists() and not (bob / "mlruns").exists()
