"""Runs left RUNNING by a killed stage: each run names the process that holds it open, and
every stage's start closes those of this host whose process is gone."""

from __future__ import annotations

import socket
from collections.abc import Mapping

import psutil
from mlflow.tracking import MlflowClient

# The process holding a run open: its host, pid and start time (a pid alone is reused).
HOST_TAG = "visiontune.host"
PID_TAG = "visiontune.pid"
PID_START_TAG = "visiontune.pid_start"


def process_tags() -> dict[str, str]:
    """The tags that say this process holds a run open."""
    process = psutil.Process()
    return {
        HOST_TAG: socket.gethostname(),
        PID_TAG: str(process.pid),
        PID_START_TAG: f"{process.create_time():.3f}",
    }


def _holder_alive(tags: Mapping[str, str]) -> bool:
    try:
        process = psutil.Process(int(tags[PID_TAG]))
        return f"{process.create_time():.3f}" == tags.get(PID_START_TAG)
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return False
    except (KeyError, ValueError, psutil.AccessDenied):
        return True  # not ours to judge: leave the run alone


def close_orphaned_runs(client: MlflowClient) -> list[str]:
    """Mark KILLED the RUNNING runs of this host whose process is gone (a SIGKILLed stage
    cannot close its own); their ids. Other hosts' runs are never touched: a pid means
    nothing across hosts."""
    host = socket.gethostname().replace("'", "\\'")
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    runs = client.search_runs(
        experiments,
        filter_string=f"attributes.status = 'RUNNING' and tags.`{HOST_TAG}` = '{host}'",
        max_results=1000,
    )
    orphans = [run.info.run_id for run in runs if not _holder_alive(run.data.tags)]
    for run_id in orphans:
        client.set_terminated(run_id, status="KILLED")
    return orphans
