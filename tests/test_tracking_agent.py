"""The stage's tracking helper process against a real MLflow SQLite store: a stage opened by
`open_stage` logs, fails, crashes or is killed, and its runs say so."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from real_config import default_raw, merge
from test_tracking import free_port

# A stage as the scripts in stages/ are written, cut down to its tracking. `action`: log
# (the normal end), fail (returns before logging), crash (an exception), kill (SIGKILL).
STAGE = textwrap.dedent("""\
    import json, os, sys
    from pathlib import Path
    import numpy
    from visiontune import tracking
    from visiontune.stagekit import open_stage, wait_for_tracking

    params_path, out, action = sys.argv[1:4]
    params, tracker = open_stage("train_head", params_path)
    if code := wait_for_tracking(tracker):
        raise SystemExit(code)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps({"valid_acc": 0.75, "epochs": 2}))
    print(json.dumps({"pid": os.getpid(), "mlflow": "mlflow" in sys.modules}), flush=True)
    if action == "crash":
        raise RuntimeError("the stage broke")
    if action == "kill":
        os.kill(os.getpid(), 9)
    if action == "fail":
        raise SystemExit(1)
    # A scalar the stage has but did not write (a NumPy one crosses the pipe too).
    code = tracking.log_stage(tracker, params, out, metrics={"extra": numpy.float32(0.5)})
    print(json.dumps({"code": code, "mlflow": "mlflow" in sys.modules}))
    raise SystemExit(code)
    """)


def run_stage(tmp_path: Path, action: str, tracking: dict) -> subprocess.CompletedProcess:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(merge(default_raw(), {"tracking": tracking})))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("DVC_", "MLFLOW"))}
    return subprocess.run(
        [sys.executable, "-c", STAGE, str(params), str(tmp_path / "out"), action],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    )


def store(tmp_path: Path) -> dict:
    return {
        "uri": f"sqlite:///{tmp_path / 'mlflow.db'}",
        "artifact_location": str(tmp_path / "mlruns"),
        "experiment": "agent",
    }


def runs(tmp_path: Path) -> dict[str, object]:
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("agent")
    found = client.search_runs([experiment.experiment_id])
    return {"train_head" if r.info.run_name == "train_head" else "parent": r for r in found}


@pytest.mark.slow
def test_the_helper_logs_for_the_stage_which_never_imports_mlflow(tmp_path: Path) -> None:
    result = run_stage(tmp_path, "log", store(tmp_path))
    assert result.returncode == 0, result.stderr
    started, finished = (json.loads(line) for line in result.stdout.splitlines()[-2:])
    assert finished == {"code": 0, "mlflow": False}
    found = runs(tmp_path)
    stage, parent = found["train_head"], found["parent"]
    assert stage.info.status == parent.info.status == "FINISHED"
    assert stage.data.metrics["head/valid_acc"] == 0.75 and stage.data.metrics["head/extra"] == 0.5
    # Runtime tags come from the stage's process; the pipeline is keyed by that process too.
    assert stage.data.tags["device"] == "cpu" and stage.data.tags["precision"] in ("bf16", "fp32")
    assert f":{started['pid']}:" in parent.data.tags["visiontune.pipeline_id"]


@pytest.mark.slow
@pytest.mark.parametrize("action", ["fail", "crash", "kill"])
def test_a_stage_that_ends_without_logging_leaves_failed_runs(tmp_path: Path, action) -> None:
    result = run_stage(tmp_path, action, store(tmp_path))
    expected = {"fail": 1, "crash": 1, "kill": -signal.SIGKILL}[action]
    assert result.returncode == expected, result.stderr
    # The helper outlives a killed stage just long enough to close its runs.
    deadline = time.monotonic() + 60
    while (found := runs(tmp_path))["train_head"].info.status == "RUNNING":
        assert time.monotonic() < deadline, "the stage's run is still RUNNING"
        time.sleep(0.5)
    assert found["train_head"].info.status == "FAILED"
    assert found["parent"].info.status == "FAILED"
    assert "head/valid_acc" not in found["train_head"].data.metrics


@pytest.mark.slow
def test_an_unusable_store_stops_the_stage_or_only_warns(tmp_path: Path) -> None:
    server = {**store(tmp_path), "uri": f"http://127.0.0.1:{free_port()}"}
    required = run_stage(tmp_path, "log", server)
    assert required.returncode == 3
    assert "unreachable" in required.stderr and "tracking.required: false" in required.stderr
    assert not (tmp_path / "out").exists()  # stopped before any output

    optional = run_stage(tmp_path, "log", {**server, "required": False})
    assert optional.returncode == 0, optional.stderr
    assert json.loads(optional.stdout.splitlines()[-1]) == {"code": 0, "mlflow": False}
    assert "continuing without tracking" in optional.stderr
    assert (tmp_path / "out" / "metrics.json").is_file()
