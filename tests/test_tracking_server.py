"""End to end: `make demo` (`dvc repro` of the real pipeline) against a real `mlflow server`,
then MlflowClient.

Also: a second `dvc repro` with nothing changed logs nothing, `dvc repro -f fetch` runs fetch
alone, `dvc exp run --temp` (which runs in a throwaway copy of the repo) lands its runs in the
ORIGINAL repo's SQLite store, `dvc exp show` lists it, and `make ui` serves that store. These
are the commands README.md and docs/ show (tests/unit/test_doc_commands.py).
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

import mlflow
import mlflow.pyfunc
import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from project_copy import dvc, free_port, make, make_command, make_project, project_env

from visiontune.config import flatten, load_params
from visiontune.fileio import sha256_file

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
MODEL_NAME = "visiontune-e2e"
OVERRIDES = {
    "runtime": {"num_workers": 0},
    "data": {"max_per_class": 8},
    "model": {"image_size": 64},
    "head": {"epochs": 1},
    "lr_find": {"num_iter": 10},
    "finetune": {"n_cycles": 2, "cycle_len": 1, "cycle_mult": 1, "batch_size": 4},
    "tta": {"n_augment": 2},
    "tracking": {"experiment": "e2e", "registered_model": MODEL_NAME, "alias": "candidate"},
}


@contextlib.contextmanager
def serving(command: list[str], port: int, log_path: Path, cwd: Path | None = None, env=None):
    """Run an MLflow server command until the block ends; yield its URL once it is healthy."""
    log = open(log_path, "w")  # noqa: SIM115 (closed below, after the process)
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if requests.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"{command} did not start serving:\n{log_path.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    command = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--workers", "1", "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
        "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with serving(command, port, root / "server.log") as url:
        yield url


def _runs(client: MlflowClient, experiment: str) -> list:
    found = client.get_experiment_by_name(experiment)
    return [] if found is None else client.search_runs([found.experiment_id], max_results=1000)


def _history(client: MlflowClient, run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def test_pipeline_is_tracked_on_a_server(server: str, tmp_path: Path) -> None:
    project = make_project(tmp_path / "project", OVERRIDES)
    env = project_env(MLFLOW_TRACKING_URI=server)
    make(project, "demo", env=env)  # `dvc repro` of the whole pipeline

    # DVC sees the same numbers: metrics and plots of the workspace render.
    shown = json.loads(dvc(project, "metrics", "show", "--json", env=env).stdout)
    files = next(iter(shown.values()))["data"]
    on_disk = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert files["outputs/evaluate/metrics.json"]["data"]["accuracy_tta"] == on_disk["accuracy_tta"]
    assert {"outputs/head/metrics.json", "outputs/finetune/metrics.json"} <= files.keys()
    dvc(project, "plots", "show", "-o", str(tmp_path / "plots"), env=env)
    page = (tmp_path / "plots" / "index.html").read_text()
    assert "lr_schedule" in page and "confusion" in page

    client = MlflowClient(tracking_uri=server, registry_uri=server)
    runs = _runs(client, "e2e")
    parents = [r for r in runs if r.data.tags.get("visiontune.role") == "pipeline"]
    assert len(parents) == 1
    parent = parents[0]
    children = {r.info.run_name: r for r in runs if r is not parent}
    stages = list(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    # source_stamp runs on every `dvc repro` and computes nothing worth a run: it logs none.
    assert sorted(children) == sorted(set(stages) - {"source_stamp"})
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in children.values())
    assert all(r.info.status == "FINISHED" for r in runs)

    # Parent: every param, provenance tags, headline metrics.
    params = load_params(project / "params.yaml")
    assert parent.data.params == {k: str(v) for k, v in flatten(params).items()}
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    tags = parent.data.tags
    assert tags["git.commit"] == head and tags["git.dirty"] == "false"
    assert tags["data.fingerprint"] == sha256_file(project / "data/prepared/manifest.csv")
    assert tags["backbone"] == params.model.backbone
    assert {"device", "precision", "visiontune.version"} <= tags.keys()
    evaluated = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert parent.data.metrics["eval/accuracy"] == pytest.approx(evaluated["accuracy"])
    assert parent.data.metrics["eval/accuracy_tta"] == pytest.approx(evaluated["accuracy_tta"])
    assert {"head/valid_acc", "finetune/valid_acc"} <= parent.data.metrics.keys()

    # Fine-tune: every step, every group's LR, SGDR's restart where the second cycle starts.
    finetune = children["finetune"].info.run_id
    steps = pd.read_csv(project / "outputs/finetune/steps.csv")
    assert _history(client, finetune, "train/loss") == pytest.approx(steps["loss"].tolist())
    groups = [c for c in steps.columns if c.startswith("lr_group")]
    assert len(groups) == params.finetune.layer_groups
    for column in groups:
        lrs = np.array(_history(client, finetune, f"lr/group{column.removeprefix('lr_group')}"))
        assert lrs == pytest.approx(steps[column].to_numpy())
        restarts = np.flatnonzero(lrs[1:] > lrs[:-1] * 1.5) + 1
        second_cycle = int(np.flatnonzero(steps["epoch"].to_numpy() == 1)[0])
        assert restarts.tolist() == [second_cycle]
    epochs = params.finetune.epochs
    assert len(client.get_metric_history(finetune, "valid/acc")) == epochs

    lr_find = children["lr_find"].info.run_id
    curve = pd.read_csv(project / "outputs/lr_find/curve.csv")
    assert len(client.get_metric_history(lr_find, "lr_find/loss")) == len(curve)
    assert "lr_find/suggested/lr" in children["lr_find"].data.metrics
    assert children["precompute"].data.metrics["precompute/images_per_s"] > 0
    assert "eval/accuracy_tta" in children["evaluate"].data.metrics

    report = {a.path for a in client.list_artifacts(children["report"].info.run_id, "report")}
    assert {"report/confusion.png", "report/report.md", "report/lr_schedule.png"} <= report
    assert "config.json" in {a.path for a in client.list_artifacts(finetune)}

    # Evaluate registers the model with the views it scored; it predicts what `visiontune
    # predict` does with the run's params.
    version = client.get_model_version_by_alias(MODEL_NAME, "candidate")
    assert version.run_id == children["evaluate"].info.run_id
    valid = pd.read_csv(project / "data/split/valid.csv").groupby("label").head(2)
    images = [project / "data/prepared" / p for p in valid["path"]]
    predicted = subprocess.run(
        [str(BIN / "visiontune"), "predict", str(project / "outputs/finetune/model.safetensors"),
         *map(str, images), "--format", "json", "--top-k", "5", "--device", "cpu",
         "--params", str(project / "params.yaml")],
        capture_output=True, text=True, check=True, env=env,
    )  # fmt: skip
    mlflow.set_tracking_uri(server)
    loaded = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@candidate")
    meta = loaded.metadata.metadata
    # The photos' bytes, decoded, cut into the model's TTA views and forwarded inside it.
    answer = loaded.predict(pd.DataFrame({"image": [p.read_bytes() for p in images]}))
    for row, (_, served) in zip(json.loads(predicted.stdout), answer.iterrows(), strict=True):
        cli = {p["label"]: p["probability"] for p in row["predictions"]}
        expected = [cli[c] for c in meta["classes"]]
        assert [served[c] for c in meta["classes"]] == pytest.approx(expected, abs=1e-5)

    # Nothing changed: DVC skips every stage and MLflow gets nothing new.
    dvc(project, "repro", env=env)
    assert len(_runs(client, "e2e")) == len(runs)
    # Files changed in place under data.source: fetch runs again when forced, alone.
    forced = dvc(project, "repro", "-f", "fetch", env=env).stdout
    assert "Running stage 'fetch'" in forced and "Running stage 'split'" not in forced

    # `dvc exp run --temp` runs in a copy without git-ignored files; with the default relative
    # store its runs must land in THIS repo's mlflow.db. Precompute is enough to see where they
    # go (it re-runs there: its `cache: false` throughput file is git-ignored; every stage
    # opens its run the same way, in stagekit).
    local = project_env()
    git = ["git", "-c", "user.name=test", "-c", "user.email=test@example.com"]
    subprocess.run([*git, "add", "dvc.lock"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=project, check=True)
    dvc(project, "exp", "run", "--temp", "--name", "tta-one", "-S", "tta.n_augment=1",
        "precompute", env=local)  # fmt: skip
    store = project / "mlflow.db"
    assert store.is_file()
    local_runs = _runs(MlflowClient(tracking_uri=f"sqlite:///{store}"), "e2e")
    exp_parent = next(r for r in local_runs if r.data.tags["visiontune.role"] == "pipeline")
    assert exp_parent.info.run_name == "tta-one"
    stage_runs = [r for r in local_runs if r is not exp_parent]
    assert "precompute" in {r.info.run_name for r in stage_runs}
    assert all(r.data.tags["mlflow.parentRunId"] == exp_parent.info.run_id for r in stage_runs)
    assert all(r.info.status == "FINISHED" for r in local_runs)
    assert exp_parent.data.tags["dvc.exp_name"] == "tta-one"
    assert exp_parent.data.params["tta.n_augment"] == "1"
    assert "tta-one" in dvc(project, "exp", "show", env=local).stdout

    # `make ui` serves this store: the experiment and its runs are there.
    port = free_port()
    command = make_command(project, "ui", f"UI_PORT={port}")
    with serving(command, port, tmp_path / "ui.log", cwd=project, env=local) as ui:
        api = f"{ui}/api/2.0/mlflow"
        found = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "e2e"})
        assert found.status_code == 200, found.text
        experiment_id = found.json()["experiment"]["experiment_id"]
        searched = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment_id]})
        assert len(searched.json()["runs"]) == len(local_runs)
