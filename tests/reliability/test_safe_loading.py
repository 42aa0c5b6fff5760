"""Safe loading: no code runs from a checkpoint or weights file, archives stay inside their
folder, the UI listens on localhost only, and no credential reaches MLflow."""

from __future__ import annotations

import ast
import pickle
import re
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from real_config import default_params

from visiontune import tracking
from visiontune.models.weights import WeightsError, read_state_dict
from visiontune.tracking.store import redact
from visiontune.train.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted([*(REPO / "src").rglob("*.py"), *(REPO / "stages").glob("*.py")])


def _calls(name: str) -> list[tuple[Path, ast.Call]]:
    """Every call of `<something>.name(...)` or `name(...)` in our code."""
    found = []
    for path in SOURCES:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call):
                func = node.func
                called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                if called == name:
                    found.append((path, node))
    return found


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return ast.literal_eval(keyword.value)
    return None


def test_every_torch_load_is_weights_only() -> None:
    calls = _calls("load")
    torch_loads = [(p, c) for p, c in calls if ast.unparse(c.func).startswith("torch.")]
    assert torch_loads, "expected the checkpoint and weights readers"
    for path, call in torch_loads:
        assert _keyword(call, "weights_only") is True, (path, ast.unparse(call))


def test_no_pickle_unsafe_yaml_or_unfiltered_tar_extraction() -> None:
    for path in SOURCES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
                assert not {"pickle", "cloudpickle", "dill", "joblib"} & set(names), path
    for path, call in _calls("load"):
        assert ast.unparse(call.func) not in ("yaml.load", "np.load", "numpy.load"), path
    for path, call in _calls("extractall"):
        # tar: Python's 'data' filter; zip: only after every member is checked (test_archive)
        text = ast.unparse(call)
        assert _keyword(call, "filter") == "data" or path.name == "archive.py", text


class _Exploit:
    """Unpickling this runs `Path(target).write_text(...)`: arbitrary code."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.write_text, (self.target, "pwned"))


@pytest.mark.parametrize("where", ["top level", "nested in the state"])
def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path: Path, where: str) -> None:
    marker = tmp_path / "pwned.txt"
    exploit = _Exploit(marker)
    state = {"format_version": 1, "model": {"w": torch.zeros(2)}}
    if where == "top level":
        state["extra"] = exploit
    else:
        state["model"]["w2"] = exploit
    path = tmp_path / "checkpoints" / "last.pt"
    path.parent.mkdir()
    torch.save(state, path)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_checkpoint(path)
    assert not marker.exists()


def test_weights_files_with_pickled_objects_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned.txt"
    path = tmp_path / "weights.pth"
    torch.save({"conv.weight": torch.zeros(1), "evil": _Exploit(marker)}, path)
    with pytest.raises(WeightsError, match="Weights only load failed"):
        read_state_dict(path)
    assert not marker.exists()


def test_make_ui_binds_localhost_only(repo_root: Path) -> None:
    makefile = (repo_root / "Makefile").read_text()
    recipe = re.search(r"^ui:.*\n((?:\t.*\n?)+)", makefile, re.MULTILINE)
    assert recipe, "no ui target"
    assert "-m visiontune.tracking.ui" in recipe.group(1)
    # The command it runs: `mlflow ui ... --host 127.0.0.1`, never every interface.
    from visiontune.tracking import ui

    source = Path(ui.__file__).read_text()
    assert '"ui",' in source and '"--host", "127.0.0.1"' in source
    assert "0.0.0.0" not in makefile + source and "--host ::" not in makefile + source


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("https://alice:s3cret@example.com/data.zip", "https://***@example.com/data.zip"),
        ("http://token@mlflow.local:5000", "http://***@mlflow.local:5000"),
        ("sqlite:////tmp/mlflow.db", "sqlite:////tmp/mlflow.db"),
        ("see user@example.com", "see user@example.com"),  # an e-mail address is no URI
        ("a=s3://k:v@b/x b=http://u:p@h", "a=s3://***@b/x b=http://***@h"),
    ],
)
def test_redact_hides_uri_credentials(value: str, expected: str) -> None:
    assert redact(value) == expected


def test_credentials_in_params_never_reach_the_store(tmp_path: Path, capsys) -> None:
    """A real SQLite store: a data URL and a (overridden) server URI carry credentials."""
    secret = "hunter2-secret"
    params = default_params(
        {
            "data": {"source": f"https://bob:{secret}@data.example.com/pets.zip"},
            "tracking": {
                "uri": f"http://bob:{secret}@mlflow.example.com",
                "artifact_location": str(tmp_path / "mlruns"),
                "experiment": "secrets",
            },
        }
    )
    store_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {"MLFLOW_TRACKING_URI": store_uri, "VISIONTUNE_PIPELINE_ID": "secret-test",
           "API_TOKEN": secret, "AWS_SECRET_ACCESS_KEY": secret}  # fmt: skip
    out = tmp_path / "finetune"
    out.mkdir()
    (out / "config.json").write_text(
        f'{{"data": {{"source": "https://bob:{secret}@data.example.com/pets.zip"}}}}'
    )
    (out / "metrics.json").write_text('{"valid_acc": 0.5}')
    tracker = tracking.preflight(params, "finetune", environ=env, cwd=tmp_path)
    tracker.set_tags({"note": f"mirror ftp://bob:{secret}@mirror.example.com"})
    assert tracking.log_stage(tracker, params, out) == 0

    client = MlflowClient(tracking_uri=store_uri)
    experiment = client.get_experiment_by_name("secrets")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2
    logged = [
        f"{key}={value}"
        for run in runs
        for key, value in [*run.data.params.items(), *run.data.tags.items()]
    ]
    assert not [entry for entry in logged if secret in entry]
    assert "data.source=https://***@data.example.com/pets.zip" in logged
    assert "tracking.uri=http://***@mlflow.example.com" in logged
    assert not [entry for entry in logged if "API_TOKEN" in entry or "AWS_SECRET" in entry]


def test_an_unreachable_store_error_does_not_print_its_credentials(tmp_path: Path) -> None:
    params = default_params(
        {"tracking": {"uri": "http://bob:hunter2@127.0.0.1:9", "required": True}}
    )
    with pytest.raises(tracking.TrackingError) as failure:
        tracking.preflight(params, "split", environ={}, cwd=tmp_path, timeout_s=0.5)
    assert "hunter2" not in str(failure.value)
    assert "***@127.0.0.1:9" in str(failure.value)
