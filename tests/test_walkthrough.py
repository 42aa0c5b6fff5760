"""README.md and docs/ followed as written, top to bottom, in a new shell, on the shipped params.

One project, laid out as a user's clone: the repo beside `../shared`, so the demo's shipped
relative mirror is what fetch reads, and `params.yaml` shrunk through documented keys only
(`project_copy.SMALL_OVERRIDES` and WALK below: data.max_per_class, model.image_size, fewer
epochs). `.venv` is the environment CI installed: `make setup` (the install step of `make
demo`) and `make test` run in CI itself. The shell's PATH does not hold the venv until the
README's own `source .venv/bin/activate`. The tests of this file run in order on that one
project, page by page, as a user reads on; the last checks that every command the pages show
was run as shown, or is listed in UNTESTED with its reason.

Substitutions, each for what this machine lacks: free ports for the documented 5000 and 5001,
a temp folder for /mnt/shared/dvc-remote, a real experiment's name for `fiery-pita`. The files
the commands name (photo.jpg, more_photos/, photos/, test/) are made in the
project from real photos.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import requests
import yaml
from doc_pages import ROOT, Block, bash_lines, blocks, normalize, page, shown_commands
from mlflow.tracking import MlflowClient
from project_copy import SHARED_DATA, free_port
from shell import Shell, user_project

from visiontune.config import flatten, load_params, parse_params
from visiontune.fileio import sha256_file

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
WALK = {
    "runtime": {"num_workers": 0},
    "data": {"max_per_class": 6},
    "model": {"image_size": 64},
    "head": {"epochs": 1},
    "lr_find": {"num_iter": 8, "batch_size": 4},
    "finetune": {"n_cycles": 2, "cycle_len": 1, "cycle_mult": 1, "batch_size": 4},
    "tta": {"n_augment": 2},
}
# Commands a test here does not run, with the reason (docs/scaling.md lists them too).
UNTESTED: dict[str, str] = {
    r"^make test$": "CI runs it (.ci/run), and it runs this file",
    r"s3://": "an S3 bucket and credentials",
    r"postgresql://": "a PostgreSQL server",
    r"^torchrun --nnodes": "several machines and a rendezvous endpoint",
    r"^torchrun --standalone --nproc_per_node=4\b": "four GPUs",
}


def _untested(line: str) -> bool:
    return any(re.search(p, c) for c in normalize(line) for p in UNTESTED)


def _store(project: Path) -> MlflowClient:
    return MlflowClient(tracking_uri=f"sqlite:///{project / 'mlflow.db'}")


def _runs(client: MlflowClient) -> list:
    experiment = client.get_experiment_by_name("visiontune")
    return client.search_runs([experiment.experiment_id], max_results=1000)


def _finished_experiments(project: Path) -> int:
    """Experiments DVC has finished and recorded: its refs/exps/<baseline>/<name> refs."""
    refs = subprocess.run(
        ["git", "for-each-ref", "--format=%(refname)", "refs/exps"],
        cwd=project,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum(bool(re.fullmatch(r"refs/exps/\w{2}/\w{38}/[^/]+", ref)) for ref in refs.split())


def _wait_for_queue(shell: Shell, line: str = "dvc queue status") -> str:
    """Run the README's status line until no experiment is queued or running. Between two
    looks, a finished experiment's git ref is watched (a `dvc` start is a second of CPU the
    experiments want); a failed one shows at the next look, at most 20 s later."""
    deadline, target = time.monotonic() + 400, None
    while True:
        result = shell.run(line, check=False)
        status = result.stdout
        if result.returncode != 0:
            # DVC reads a running task's info file while its worker rewrites it, and then
            # fails with a JSON error (treeverse/dvc#8014): a user looks again, so do we.
            assert "Expecting value" in result.stderr, result.stderr[-3000:]
            assert time.monotonic() < deadline, result.stderr[-3000:]
            time.sleep(2)
            continue
        if "Failed" in status:
            pytest.fail(
                f"a queued experiment failed:\n{status}\n"
                + shell.run(
                    "dvc queue logs " + status.split("Failed")[0].split()[-3], check=False
                ).stdout
            )
        pending = len(re.findall(r"\b(?:Queued|Running)\b", status))
        if not pending:
            return status
        assert time.monotonic() < deadline, status
        finished = _finished_experiments(shell.cwd)
        if target is not None and finished >= target:  # recorded, its task still closing
            time.sleep(2)
            continue
        target, look_again = finished + pending, time.monotonic() + 20
        while _finished_experiments(shell.cwd) < target and time.monotonic() < look_again:
            time.sleep(1)


def validate_yaml(block: Block, shipped: dict) -> None:
    """A params snippet of a page, merged into the shipped params, passes the loader."""
    snippet = yaml.safe_load(block.text)
    merged = json.loads(json.dumps(shipped))
    for section, values in snippet.items():
        merged[section].update(values)
    parse_params(merged)


@pytest.fixture(scope="module")
def walk(tmp_path_factory: pytest.TempPathFactory) -> Shell:
    root = tmp_path_factory.mktemp("walk")
    shell = user_project(root, WALK)
    project = shell.cwd
    photos = sorted((SHARED_DATA / "dogscats" / "valid" / "dogs").glob("*.jpg"))[:3]
    shutil.copy(photos[0], project / "photo.jpg")
    for folder in ("more_photos", "photos", "test"):
        (project / folder).mkdir()
        for photo in photos[1:]:
            shutil.copy(photo, project / folder / photo.name)
    subprocess.run(
        ["git", "init", "-q", "--bare", "-b", "main", str(root / "origin.git")], check=True
    )
    for git in (["remote", "add", "origin", str(root / "origin.git")],
                ["push", "-q", "-u", "origin", "main"]):  # fmt: skip
        subprocess.run(["git", *git], cwd=project, check=True)
    shell.substitutions.update({"5000": str(free_port()), "5001": str(free_port()),
                                "/mnt/shared/dvc-remote": str(root / "dvc-remote")})  # fmt: skip
    shell.env["UI_PORT"] = shell.substitutions["5000"]
    return shell


def test_readme_top_to_bottom(walk: Shell) -> None:
    project = walk.cwd
    shipped = yaml.safe_load((project / "params.yaml").read_text())
    for block in blocks(page("README.md")):
        if block.language == "yaml":
            validate_yaml(block, shipped)
    stages_logged: list = []
    lines = bash_lines("README.md")
    commands = [normalize(line)[0] for line in lines]
    assert commands.index("source .venv/bin/activate") > commands.index("make demo")
    # A new shell: no dvc until the README's activation line.
    bare = subprocess.run(["bash", "-c", "command -v dvc"], env=walk.env, capture_output=True)
    assert bare.returncode != 0, bare.stdout
    for line in lines:
        if _untested(line):
            continue
        if line.startswith("make ui"):
            _check_ui(walk, line)
            continue
        if line.startswith("dvc queue status"):
            _wait_for_queue(walk, line)
            continue
        result = walk.run(line)
        if line.startswith("make demo"):
            _check_demo(project)
            stages_logged = _runs(_store(project))
        elif line.startswith("dvc metrics show"):
            assert "accuracy_tta" in result.stdout
        elif line == "dvc repro":  # nothing changed: DVC runs source_stamp alone, logs nothing
            assert "Running stage 'fetch'" not in result.stdout
            assert len(_runs(_store(project))) == len(stages_logged)
        elif line.startswith("dvc exp show"):
            _check_experiments(project, result.stdout, walk.substitutions)
        elif "--top-k 3" in line:
            assert result.stdout.count("dog") >= 3, result.stdout
        elif "--format csv" in line:
            table = pd.read_csv(project / "preds.csv")
            assert set(table["path"]) == {
                f"photos/{p.name}" for p in (project / "photos").iterdir()
            }
    walk.run("make help")


def _check_demo(project: Path) -> None:
    """`make demo`: the whole pipeline ran, read the shipped mirror, and is in MLflow."""
    assert (project / "outputs/finetune/model.safetensors").is_file()
    config = json.loads((project / "data/prepared/config.json").read_text())
    assert config["fetch"]["source"]["used"] == "../shared/data/dogscats"
    client = _store(project)
    runs = _runs(client)
    parent = next(r for r in runs if r.data.tags["visiontune.role"] == "pipeline")
    stages = set(yaml.safe_load((project / "dvc.yaml").read_text())["stages"])
    assert {r.info.run_name for r in runs if r is not parent} == stages - {"source_stamp"}
    assert all(r.info.status == "FINISHED" for r in runs)
    params = load_params(project / "params.yaml")
    assert parent.data.params == {k: str(v) for k, v in flatten(params).items()}
    # The UI's Dataset and Source columns: MLflow's own dataset input and source tags.
    fingerprint = sha256_file(project / "data/prepared/manifest.csv")
    (dataset,) = parent.inputs.dataset_inputs
    assert dataset.dataset.name == "cats_and_dogs_filtered"
    assert dataset.dataset.digest == fingerprint[:32]
    assert json.loads(dataset.dataset.source)["url"] == params.data.source
    tags = parent.data.tags
    assert tags["data.fingerprint"] == fingerprint
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True,
                          text=True, check=True).stdout.strip()  # fmt: skip
    assert tags["mlflow.source.git.commit"] == head and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.source.name"] == str(project.resolve())
    version = client.get_model_version_by_alias("visiontune", "candidate")
    children = {r.info.run_name: r for r in runs if r is not parent}
    assert version.run_id == children["evaluate"].info.run_id
    evaluated = json.loads((project / "outputs/evaluate/metrics.json").read_text())
    assert parent.data.metrics["eval/accuracy_tta"] == pytest.approx(evaluated["accuracy_tta"])
    # Fine-tune: every step, every group's LR, SGDR's restart where the second cycle starts.
    finetune = children["finetune"].info.run_id
    steps = pd.read_csv(project / "outputs/finetune/steps.csv")

    def history(run_id: str, key: str) -> list[float]:
        points = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
        return [m.value for m in points]

    assert history(finetune, "train/loss") == pytest.approx(steps["loss"].tolist())
    groups = [c for c in steps.columns if c.startswith("lr_group")]
    assert len(groups) == params.finetune.layer_groups
    for column in groups:
        lrs = np.array(history(finetune, f"lr/group{column.removeprefix('lr_group')}"))
        assert lrs == pytest.approx(steps[column].to_numpy())
        restarts = np.flatnonzero(lrs[1:] > lrs[:-1] * 1.5) + 1
        assert restarts.tolist() == [int(np.flatnonzero(steps["epoch"].to_numpy() == 1)[0])]
    assert len(history(finetune, "valid/acc")) == params.finetune.epochs
    curve = pd.read_csv(project / "outputs/lr_find/curve.csv")
    assert len(history(children["lr_find"].info.run_id, "lr_find/loss")) == len(curve)
    report = {a.path for a in client.list_artifacts(children["report"].info.run_id, "report")}
    assert {"report/confusion.png", "report/report.md", "report/lr_schedule.png"} <= report
    # The baseline the experiments compare with, committed as the README's user would.
    git = ["git", "-c", "user.name=Ada", "-c", "user.email=ada@example.com"]
    subprocess.run([*git, "add", "-A"], cwd=project, check=True)
    subprocess.run([*git, "commit", "-qm", "baseline"], cwd=project, check=True)


def _check_experiments(project: Path, shown: str, walk_substitutions: dict) -> None:
    """Three experiments, each with its metrics in `dvc exp show` and its runs in MLflow,
    named after it; the queued two ran side by side, each in its own copy of the repo."""
    experiments = _experiments(project)
    assert len(experiments) == 3, experiments.keys()
    for name, data in experiments.items():
        assert name in shown
        metrics = data["metrics"]["outputs/evaluate/metrics.json"]["data"]
        assert 0 <= metrics["accuracy_tta"] <= 1, name
    # The name the pages write as `fiery-pita`: the queued experiment of zoom 1.3.
    tta = {n: d["params"]["params.yaml"]["data"]["tta"] for n, d in experiments.items()}
    walk_substitutions["fiery-pita"] = next(n for n, t in tta.items() if t["zoom"] == 1.3)
    assert sorted((t["n_augment"], t["zoom"]) for t in tta.values()) == [
        (9, 1.0), (9, 1.15), (9, 1.3)]  # fmt: skip
    client = _store(project)
    runs = _runs(client)
    parents = {r.data.tags.get("dvc.exp_name"): r for r in runs
               if r.data.tags["visiontune.role"] == "pipeline"}  # fmt: skip
    assert set(experiments) <= parents.keys()
    for name in experiments:
        parent = parents[name]
        assert parent.info.run_name == name
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert "evaluate" in {r.info.run_name for r in children}
        assert all(r.info.status == "FINISHED" for r in [parent, *children])
        # Never the experiment's temp copy, which DVC deletes.
        assert ".dvc/tmp" not in parent.data.tags["mlflow.source.name"]
        version = client.get_model_version_by_alias("visiontune", f"exp-{name}")
        assert version.tags["dvc.exp_name"] == name
    # The workspace's own run keeps `candidate`, whichever experiment finished last.
    candidate = client.get_model_version_by_alias("visiontune", "candidate")
    assert "dvc.exp_name" not in candidate.tags


def _check_ui(walk: Shell, line: str) -> None:
    url = f"http://127.0.0.1:{walk.env['UI_PORT']}"
    log = walk.cwd.parent / "ui.log"
    with walk.serve(line, url, log) as served:
        experiment = _store(walk.cwd).get_experiment_by_name("visiontune")
        ids = {"experiment_ids": [experiment.experiment_id]}
        runs = requests.post(f"{served}/api/2.0/mlflow/runs/search", json=ids, timeout=30)
        assert len(runs.json()["runs"]) == len(_runs(_store(walk.cwd)))
    assert f"MLflow UI: {url}/#/experiments/{experiment.experiment_id}/runs" in log.read_text()


def test_use_the_model_page(walk: Shell) -> None:
    """The served model over HTTP (curl), pyfunc in Python, the CLI on the file carried out."""
    project = walk.cwd
    lines = bash_lines("use-the-model.md")
    starts = ("mlflow models serve", "printf")
    serve, curl = (next(line for line in lines if line.startswith(s)) for s in starts)
    url = f"http://127.0.0.1:{walk.substitutions['5001']}"
    with walk.serve(serve, url, project.parent / "serve.log", health="/ping"):
        answer = json.loads(walk.run(curl).stdout)["predictions"]
    classes = ["cats", "dogs"]
    # The registered model's file, carried out of the repo into an empty folder (no
    # params.yaml there), predicts what the served model answers.
    client = _store(project)
    candidate = client.get_model_version_by_alias("visiontune", "candidate")
    carried = project.parent / "carried"
    carried.mkdir()
    file = client.download_artifacts(candidate.run_id, "weights/model.safetensors", str(carried))
    (carried / "photo.jpg").write_bytes((project / "photo.jpg").read_bytes())
    line = f"visiontune predict {Path(file).relative_to(carried)} photo.jpg --format json --top-k 2"
    cli = json.loads(walk.run(line, cwd=carried).stdout)[0]["predictions"]
    for row in cli:
        assert answer[0][row["label"]] == pytest.approx(row["probability"], abs=1e-5)
    # The README's file is the one the workspace's experiment (not a queued one) registered.
    tta = {n: d["params"]["params.yaml"]["data"]["tta"] for n, d in _experiments(project).items()}
    (here,) = [name for name, t in tta.items() if t["zoom"] not in (1.0, 1.3)]
    (version,) = [v for v in client.search_model_versions("name='visiontune'")
                  if v.tags.get("dvc.exp_name") == here]  # fmt: skip
    registered = client.download_artifacts(version.run_id, "weights/model.safetensors",
                                           str(project.parent))  # fmt: skip
    assert sha256_file(Path(registered)) == sha256_file(
        project / "outputs/evaluate/model.safetensors"
    )
    assert len(answer) == 1 and answer[0]["error"] == ""
    assert answer[0]["label"] == max(classes, key=lambda c: answer[0][c])
    assert sum(answer[0][c] for c in classes) == pytest.approx(1.0, abs=1e-5)
    (python,) = [b.text for b in blocks(page("use-the-model.md")) if b.language == "python"]
    printed = walk.run(f"python - <<'EOF'\n{python}EOF").stdout
    assert answer[0]["label"] in printed and "['cats', 'dogs']" in printed
    for line in lines:  # the README's own line ran already
        if line.startswith("visiontune predict") and normalize(line)[0] not in walk.ran:
            walk.run(line)
    submission = pd.read_csv(project / "submission.csv")
    assert list(submission.columns) == ["id", *classes] and len(submission) == 2


def test_tracking_page(walk: Shell) -> None:
    """DVC's view (metrics, plots) and a tracking server the stages log to."""
    project = walk.cwd
    server = None
    for line in bash_lines("tracking.md"):
        if line.startswith("mlflow server"):
            server = line
        elif line.startswith("MLFLOW_TRACKING_URI="):
            url = f"http://127.0.0.1:{walk.substitutions['5000']}"
            assert server is not None
            with walk.serve(server, url, project.parent / "server.log"):
                walk.run(line)  # nothing changed: DVC runs source_stamp alone, which logs nothing
                # A stage that runs logs to the server, its artifacts into the server's store.
                walk.run(line.replace("dvc repro", "dvc repro -f -s report"))
                client = MlflowClient(tracking_uri=url)
                experiment = client.get_experiment_by_name("visiontune").experiment_id
                runs = client.search_runs([experiment])
                assert sorted(r.data.tags["visiontune.role"] for r in runs) == ["pipeline", "stage"]
                assert {r.info.status for r in runs} == {"FINISHED"}
            assert any((project / "artifacts").rglob("report.md"))  # the server's store
        elif not line.startswith("make ui"):  # the README's: run above
            walk.run(line)
    assert "confusion" in (project / "dvc_plots" / "index.html").read_text()
    # The applied experiment, evaluated in the workspace, is now the candidate.
    client = _store(project)
    candidate = client.get_model_version_by_alias("visiontune", "candidate")
    applied = client.get_model_version_by_alias(
        "visiontune", f"exp-{walk.substitutions['fiery-pita']}"
    )
    assert int(candidate.version) > int(applied.version) and "dvc.exp_name" not in candidate.tags
    run = client.get_run(candidate.run_id)
    assert run.data.metrics["eval/accuracy_tta"] == pytest.approx(
        client.get_run(applied.run_id).data.metrics["eval/accuracy_tta"])  # fmt: skip


def test_scaling_page(walk: Shell) -> None:
    """A team: a DVC remote, a teammate's clone that pulls and has nothing to re-run, and an
    experiment shared with `dvc exp push` and applied by the teammate."""
    alice = walk.cwd
    bob = alice.parent / "bob"
    shown = [line for line in bash_lines("scaling.md") if not _untested(line)]
    experiment = _experiments(alice)
    name = walk.substitutions["fiery-pita"]
    cloned = False
    for line in shown:
        teammate = line.startswith(("git pull", "dvc pull", "dvc status", "dvc exp pull",
                                    "dvc exp apply"))  # fmt: skip
        if teammate and not cloned:
            subprocess.run(["git", "clone", "-q", str(alice.parent / "origin.git"), str(bob)],
                           check=True, env=walk.env)  # fmt: skip
            cloned = True
        result = walk.run(line, cwd=bob if teammate else alice)
        if line.startswith("dvc status"):
            # Bob has the outputs: only source_stamp, which always runs, is listed.
            assert "always changed" in result.stdout and "changed deps" not in result.stdout
    for rel in ("outputs/features/features.safetensors", "outputs/finetune/model.safetensors"):
        assert (bob / rel).is_file(), rel
    metrics = json.loads((bob / "outputs/evaluate/metrics.json").read_text())
    expected = experiment[name]["metrics"]["outputs/evaluate/metrics.json"]["data"]
    assert metrics["accuracy_tta"] == expected["accuracy_tta"]
    params = yaml.safe_load((bob / "params.yaml").read_text())
    assert params == experiment[name]["params"]["params.yaml"]["data"]


def _experiments(project: Path) -> dict[str, dict]:
    """`dvc exp show --json`: each experiment's params and metrics, by name."""
    table = json.loads(subprocess.run(
        [str(VENV_BIN / "dvc"), "exp", "show", "--json"], cwd=project, capture_output=True,
        text=True, check=True).stdout)  # fmt: skip
    return {
        exp["name"]: exp["revs"][0]["data"]
        for baseline in table
        for exp in baseline.get("experiments") or []
    }


def test_every_command_shown_is_run_as_shown_or_untested(walk: Shell) -> None:
    missing = [
        f"{page}: {command}"
        for page, commands in shown_commands().items()
        if page != "data.md"  # tests/test_walkthrough_data.py runs that page
        for command in commands
        if command not in walk.ran and not _untested(command)
    ]
    assert missing == []


def test_untested_commands_are_listed_in_the_docs_with_the_reason() -> None:
    scaling = (ROOT / "docs" / "scaling.md").read_text(encoding="utf-8")
    section = scaling.split("## Untested commands", 1)[1]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    for pattern in UNTESTED:
        assert any(re.search(pattern, row.split("|")[1].strip("` ")) for row in rows), pattern


def test_no_untested_entry_is_stale() -> None:
    every = [c for commands in shown_commands().values() for c in commands]
    assert [p for p in UNTESTED if not any(re.search(p, c) for c in every)] == []
