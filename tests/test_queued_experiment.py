"""`dvc exp run --queue`: each experiment runs in a temp copy from a background worker, and
its runs land in the original repo's store (a file of its own so that it runs beside the
server end-to-end test)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from project_copy import dvc, make_project, project_env

from visiontune.config import load_params

pytestmark = pytest.mark.slow


def _runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def test_queued_experiment_lands_in_the_original_store(tmp_path: Path) -> None:
    # `dvc exp run --queue` runs each experiment in a temp copy from a background worker;
    # the first two stages are enough to see where the runs go.
    project = make_project(tmp_path / "project", {"data": {"max_per_class": 4}})
    env = project_env()
    dvc(project, "exp", "run", "--queue", "--name", "queued-one", "split", env=env)
    dvc(project, "queue", "start", env=env)
    deadline = time.monotonic() + 240
    status = ""
    while "Success" not in status and time.monotonic() < deadline:
        assert "Failed" not in status, dvc(project, "queue", "logs", "queued-one", env=env).stdout
        time.sleep(2)
        status = dvc(project, "queue", "status", env=env).stdout
    assert "Success" in status, status
    client = MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")
    runs = _runs(client, load_params(project / "params.yaml").tracking.experiment)
    assert sorted(r.info.run_name for r in runs) == ["fetch", "queued-one", "split"]
    assert len({r.data.tags["visiontune.pipeline_id"] for r in runs}) == 1
