"""Tracking against a real MLflow SQLite store: store resolution, run layout, batching, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from project_copy import free_port
from real_config import default_params, default_section

from visiontune import tracking
from visiontune.config import TrackingParams, flatten
from visiontune.tracking.store import pipeline_id, repo_root, resolve_store, resolve_uri


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One SQLite store for the module: creating the schema costs ~2 s per database.
    return tmp_path_factory.mktemp("mlflow")


@pytest.fixture
def params(store_dir: Path, request: pytest.FixtureRequest):
    experiment = request.node.name.replace("[", "-").replace("]", "")
    return default_params(
        {
            "tracking": {
                "uri": f"sqlite:///{store_dir / 'mlflow.db'}",
                "artifact_location": str(store_dir / "mlruns"),
                "experiment": experiment,
            }
        }
    )


def client_for(params) -> MlflowClient:
    return MlflowClient(tracking_uri=params.tracking.uri)


def runs_of(params) -> list:
    client = client_for(params)
    experiment = client.get_experiment_by_name(params.tracking.experiment)
    return [] if experiment is None else client.search_runs([experiment.experiment_id])


def write_finetune_outputs(out: Path, steps: int, groups: int = 3) -> None:
    out.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"step": range(steps), "epoch": [i * 2 // steps for i in range(steps)]})
    frame["loss"] = [1.0 / (1 + i) for i in range(steps)]
    for group in range(groups):
        frame[f"lr_group{group}"] = [10.0**-group * (1 - i / steps) for i in range(steps)]
    frame.to_csv(out / "steps.csv", index=False)
    history = {"epoch": [0, 1], "train_loss": [0.9, 0.5], "valid_loss": [0.8, 0.6]}
    pd.DataFrame({**history, "valid_acc": [0.7, 0.85]}).to_csv(out / "history.csv", index=False)
    (out / "metrics.json").write_text(json.dumps({"valid_acc": 0.85, "valid_loss": 0.6}))
    (out / "config.json").write_text(json.dumps({"finetune": {"lr": 0.01, "n_cycles": 2}}))


# -- store resolution ------------------------------------------------------------------------


def test_relative_stores_resolve_against_the_repo_root(tmp_path: Path) -> None:
    store = resolve_store(default_section(TrackingParams), tmp_path)
    assert store.uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    assert store.artifact_location == (tmp_path / "mlruns").as_uri()
    assert resolve_uri("sqlite:////abs/m.db", tmp_path) == "sqlite:////abs/m.db"
    assert resolve_uri("file:runs", tmp_path) == (tmp_path / "runs").as_uri()
    assert resolve_uri("runs", tmp_path) == (tmp_path / "runs").as_uri()
    server = resolve_store(
        default_section(TrackingParams), tmp_path, env_uri="http://127.0.0.1:5000/"
    )
    assert (server.uri, server.artifact_location) == ("http://127.0.0.1:5000", None)


def test_repo_root_prefers_dvc_root_then_git_top_level(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    (repo / "sub").mkdir(parents=True)
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True)
    assert repo_root({}, repo / "sub") == repo.resolve()
    # `dvc exp run --temp` runs in a copy but points DVC_ROOT at the original repo.
    assert repo_root({"DVC_ROOT": str(tmp_path)}, repo / "sub") == tmp_path.resolve()
    outside = tmp_path / "plain"
    outside.mkdir()
    assert repo_root({"GIT_CEILING_DIRECTORIES": str(tmp_path)}, outside) in {
        outside.resolve(),
        *[p.resolve() for p in outside.parents],
    }


def test_pipeline_id_is_shared_by_the_children_of_one_dvc_process(tmp_path: Path) -> None:
    # A real process tree: an executable named `dvc` launching two "stages" (via a shell, as
    # DVC does) must give both the same key; a second `dvc` process a different one.
    fake_dvc = tmp_path / "bin" / "dvc"
    fake_dvc.parent.mkdir()
    stage = (
        "import os; from visiontune.tracking.store import pipeline_id; "
        "print(pipeline_id({}, os.getpid()))"
    )
    fake_dvc.write_text(
        textwrap.dedent(f"""\
        #!{sys.executable}
        import subprocess, sys
        for _ in range(2):
            subprocess.run(["/bin/sh", "-c", sys.argv[1]], check=True)
        """)
    )
    fake_dvc.chmod(0o755)
    command = f"{sys.executable} -c '{stage}'"
    first = subprocess.run([str(fake_dvc), command], capture_output=True, text=True, check=True)
    second = subprocess.run([str(fake_dvc), command], capture_output=True, text=True, check=True)
    first_ids, second_ids = first.stdout.split(), second.stdout.split()
    assert len(set(first_ids)) == 1 and first_ids[0].startswith("dvc:")
    assert len(set(second_ids)) == 1 and second_ids != first_ids
    assert pipeline_id({"VISIONTUNE_PIPELINE_ID": "ci-42"}, os.getpid()) == "ci-42"
    # Not under dvc: the process is its own pipeline.
    assert pipeline_id({}, os.getpid()).startswith("process:")


# -- runs ------------------------------------------------------------------------------------


def test_one_parent_per_pipeline_and_one_child_per_stage(params, tmp_path: Path) -> None:
    env = {"VISIONTUNE_PIPELINE_ID": f"pipeline-a-{time.time()}", "DVC_EXP_NAME": "tidy-lamb"}
    for stage in ("train_head", "finetune"):
        tracker = tracking.preflight(
            params,
            stage,
            environ=env,
            cwd=tmp_path,
            runtime_tags={"device": "cpu", "precision": "fp32"},
        )
        write_finetune_outputs(tmp_path / stage, steps=10)
        assert tracking.log_stage(tracker, params, tmp_path / stage) == 0
    other = tracking.preflight(params, "evaluate", environ={"VISIONTUNE_PIPELINE_ID": "b"})
    assert tracking.log_stage(other, params, tmp_path / "missing") == 0

    runs = runs_of(params)
    parents = [r for r in runs if r.data.tags["visiontune.role"] == "pipeline"]
    assert len(parents) == 2
    parent = next(
        r for r in parents if r.data.tags["visiontune.pipeline_id"] == env["VISIONTUNE_PIPELINE_ID"]
    )
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.info.run_name for r in children) == ["finetune", "train_head"]
    assert all(r.info.status == "FINISHED" for r in [parent, *children])
    assert parent.info.run_name == "tidy-lamb"
    assert parent.data.tags["dvc.exp_name"] == "tidy-lamb"
    assert parent.data.tags["backbone"] == params.model.backbone
    assert {"device", "precision", "visiontune.version"} <= parent.data.tags.keys()
    expected = {key: str(value) for key, value in flatten(params).items()}
    assert parent.data.params == expected
    # Headline numbers are copied up; child params come from the stage's config.json.
    assert parent.data.metrics == {"head/valid_acc": 0.85, "finetune/valid_acc": 0.85}
    assert children[0].data.params == {"finetune.lr": "0.01", "finetune.n_cycles": "2"}


def test_series_are_batched_with_their_steps(params, tmp_path: Path) -> None:
    tracker = tracking.preflight(params, "finetune", environ={"VISIONTUNE_PIPELINE_ID": "s"})
    write_finetune_outputs(tmp_path, steps=2345)
    assert tracking.log_stage(tracker, params, tmp_path) == 0
    client = client_for(params)
    loss = client.get_metric_history(tracker.run_id, "train/loss")
    assert [m.step for m in sorted(loss, key=lambda m: m.step)] == list(range(2345))
    for group in range(3):
        history = client.get_metric_history(tracker.run_id, f"lr/group{group}")
        assert len(history) == 2345
        assert max(m.value for m in history) == pytest.approx(10.0**-group)
    epochs = client.get_metric_history(tracker.run_id, "valid/acc")
    assert sorted((m.step, m.value) for m in epochs) == [(0, 0.7), (1, 0.85)]
    assert len(client.get_metric_history(tracker.run_id, "train/epoch_loss")) == 2
    artifacts = {a.path for a in client.list_artifacts(tracker.run_id)}
    assert {"config.json", "history.csv", "metrics.json"} <= artifacts


def test_report_artifacts_and_lr_find_curve(params, tmp_path: Path) -> None:
    env = {"VISIONTUNE_PIPELINE_ID": "r"}
    curve = tmp_path / "lr_find"
    curve.mkdir()
    lrs = [1e-5 * 10 ** (i / 4) for i in range(12)]
    pd.DataFrame({"lr": lrs, "loss": [1.0] * 12}).to_csv(curve / "curve.csv", index=False)
    (curve / "suggestion.json").write_text(json.dumps({"lr": 3e-3, "method": "valley"}))
    tracker = tracking.preflight(params, "lr_find", environ=env)
    assert tracking.log_stage(tracker, params, curve) == 0
    client = client_for(params)
    history = client.get_metric_history(tracker.run_id, "lr_find/lr")
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx(lrs)
    assert len(client.get_metric_history(tracker.run_id, "lr_find/loss")) == 12
    assert client.get_run(tracker.run_id).data.metrics["lr_find/suggested/lr"] == pytest.approx(
        3e-3
    )

    report = tmp_path / "report"
    report.mkdir()
    for name in ("confusion.png", "confusion.csv", "report.md"):
        (report / name).write_bytes(b"x")
    tracker = tracking.preflight(params, "report", environ=env)
    assert tracking.log_stage(tracker, params, report) == 0
    listed = {a.path for a in client.list_artifacts(tracker.run_id, "report")}
    assert listed == {"report/confusion.png", "report/confusion.csv", "report/report.md"}


def test_disabled_tracking_touches_no_store(tmp_path: Path) -> None:
    params = default_params({"tracking": {"enabled": False, "uri": f"sqlite:///{tmp_path}/x.db"}})
    tracker = tracking.preflight(params, "fetch", environ={})
    assert not tracker.enabled
    assert tracking.log_stage(tracker, params, tmp_path) == 0
    assert not (tmp_path / "x.db").exists()


# -- failures --------------------------------------------------------------------------------


def test_unreachable_server_fails_fast_or_warns(tmp_path: Path, caplog) -> None:
    env = {"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"}
    required = default_params({})
    started = time.monotonic()
    with pytest.raises(tracking.TrackingUnavailableError, match="unreachable"):
        tracking.preflight(required, "precompute", environ=env, timeout_s=2)
    assert time.monotonic() - started < 5
    optional = default_params({"tracking": {"required": False}})
    tracker = tracking.preflight(optional, "precompute", environ=env, timeout_s=2)
    assert not tracker.enabled
    assert "continuing without tracking" in caplog.text


@pytest.mark.parametrize("required", [True, False])
def test_logging_failure_keeps_outputs(params, tmp_path: Path, required: bool, caplog) -> None:
    params = default_params(
        {
            **params.model_dump(mode="json"),
            "tracking": {**params.tracking.model_dump(), "required": required},
        }
    )
    tracker = tracking.preflight(params, "finetune", environ={"VISIONTUNE_PIPELINE_ID": "f"})
    out = tmp_path / "out"
    write_finetune_outputs(out, steps=5)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # Break the run's artifact store after preflight: a file where its folder must go.
    artifact_dir = Path(
        client_for(params).get_run(tracker.run_id).info.artifact_uri.removeprefix("file://")
    )
    artifact_dir.parent.mkdir(parents=True, exist_ok=True)
    artifact_dir.write_text("not a folder")

    code = tracking.log_stage(tracker, params, out)

    assert code == (1 if required else 0)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert client_for(params).get_run(tracker.run_id).info.status == "FAILED"
    if not required:
        assert "outputs in" in caplog.text


def test_a_stage_that_crashes_leaves_a_failed_run(params, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""\
        from visiontune import tracking
        from visiontune.config import parse_params
        params = parse_params({params.model_dump(mode="json")!r})
        tracking.preflight(params, "train_head", environ={{"VISIONTUNE_PIPELINE_ID": "crash"}})
        raise RuntimeError("the stage broke")
        """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 1 and "the stage broke" in result.stderr
    statuses = {r.info.run_name: r.info.status for r in runs_of(params)}
    assert statuses["train_head"] == "FAILED"


# -- parallel experiments --------------------------------------------------------------------

_OPEN_STORE = """
import os, sys, time
from pathlib import Path
from real_config import default_params
from visiontune import tracking
params = default_params({"tracking": {"uri": sys.argv[1], "experiment": "race"}})
time.sleep(max(0.0, float(sys.argv[2]) - time.time()))  # both start at the same instant
environ = {"VISIONTUNE_PIPELINE_ID": f"race-{os.getpid()}"}
tracker = tracking.preflight(params, "fetch", environ=environ, cwd=Path(sys.argv[3]))
tracker.end("FINISHED")
"""


def test_two_processes_open_a_new_sqlite_store_at_once(tmp_path: Path) -> None:
    # Two queued experiments (`dvc queue start -j 2`) open a new store together: without the
    # lock, MLflow's table creation raced ("duplicate column name: step").
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    start = time.time() + 3
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_STORE, uri, str(start), str(tmp_path)],
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    errors = [p.communicate(timeout=120)[1] for p in processes]
    assert [p.returncode for p in processes] == [0, 0], errors
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("race")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.run_name for r in runs if r.data.tags.get("visiontune.role") == "stage") \
        == ["fetch", "fetch"]  # fmt: skip
    # MLflow 3's UI opens a model-training experiment on its runs, not the GenAI overview.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


def test_only_a_workspace_run_moves_the_alias() -> None:
    from visiontune.tracking.model import version_alias

    assert version_alias("candidate", None) == "candidate"
    assert version_alias("candidate", "fiery-pita") == "exp-fiery-pita"
    assert version_alias("candidate", "lr sweep/1") == "exp-lr-sweep-1"
