"""stages/fetch.py and stages/split.py run in-process via main(argv), as DVC would run them."""

from __future__ import annotations

import importlib.util
import json
import zipfile
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from project_copy import stage_argv
from real_config import default_raw, merge

from visiontune.config import DEMO_MIRROR, DEMO_SOURCE

REPO_ROOT = Path(__file__).resolve().parents[2]


def _stage(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"stage_{name}", REPO_ROOT / "stages" / f"{name}.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


fetch, split = _stage("fetch"), _stage("split")


@pytest.fixture
def project(
    tmp_path: Path, make_jpeg: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> Path:
    """A working dir with a small generated dataset (one broken file) and a params file."""
    data = tmp_path / "photos"
    seed = 0
    for label, n in (("cats", 12), ("dogs", 9), ("one", 1)):
        for i in range(n):
            seed += 1
            make_jpeg(data / label / f"{label} {i}.jpg", seed=seed)
    (data / "dogs" / "broken.jpg").write_bytes(b"")
    params = {
        "base": {"seed": 3},
        "data": {"source": "photos"},  # data.mirrors: the shipped one
        "split": {"valid_pct": 0.25, "seed": 5},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(merge(default_raw(), params)))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_fetch_then_split_write_every_output(project: Path, capsys) -> None:
    assert fetch.main(stage_argv("fetch")) == 0
    prepared = project / "data" / "prepared"
    assert {p.name for p in prepared.iterdir()} == {
        "images",
        "manifest.csv",
        "rejects.csv",
        "edits.csv",
        "config.json",
    }
    config = json.loads((prepared / "config.json").read_text())
    assert config["fetch"]["source"]["used"] == "photos"
    assert config["fetch"]["source"]["reason"] == "data.source, found in the repo"
    assert config["data"]["mirrors"] == {DEMO_SOURCE: [DEMO_MIRROR]} and config["base"] == {
        "seed": 3
    }
    assert (prepared / "rejects.csv").read_text() == (
        "path,reason\ndogs/broken.jpg,empty file (0 bytes)\n"
    )
    out = capsys.readouterr().out
    assert "fetch: source photos (a folder per class): data.source, found in the repo" in out
    assert "22 images in 3 classes" in out and "1 files rejected" in out

    assert split.main(stage_argv("split")) == 0
    result = project / "data" / "split"
    report = json.loads((result / "report.json").read_text())
    assert report["dropped_classes"] == {"one": 1}
    assert report["per_class"] == {
        "cats": {"train": 9, "valid": 3},
        "dogs": {"train": 7, "valid": 2},
    }
    assert json.loads((result / "classes.json").read_text()) == ["cats", "dogs"]
    train = (result / "train.csv").read_text().splitlines()
    assert train[0] == "path,label" and len(train) == 17
    assert all((prepared / line.rsplit(",", 1)[0]).is_file() for line in train[1:])


def test_outputs_are_byte_identical_across_runs(project: Path) -> None:
    names = ("prepared/manifest.csv", "prepared/rejects.csv", "split/classes.json")
    names += ("split/train.csv", "split/valid.csv", "split/report.json")
    runs = []
    for _ in range(2):
        assert fetch.main(stage_argv("fetch")) == 0 and split.main(stage_argv("split")) == 0
        runs.append({name: (project / "data" / name).read_bytes() for name in names})
    assert runs[0] == runs[1]


def test_bad_params_exit_2_naming_the_key(project: Path, capsys) -> None:
    (project / "bad.yaml").write_text("data:\n  sourse: photos\n")
    assert fetch.main(stage_argv("fetch", params="bad.yaml")) == 2
    assert split.main(stage_argv("split", params="bad.yaml")) == 2
    assert "data.sourse: unknown key" in capsys.readouterr().err


def test_failed_fetch_keeps_the_previous_output(project: Path, capsys) -> None:
    assert fetch.main(stage_argv("fetch")) == 0
    before = (project / "data/prepared/manifest.csv").read_bytes()
    with zipfile.ZipFile(project / "evil.zip", "w") as archive:
        archive.writestr("cats/a.jpg", b"x")
        archive.writestr("/etc/cron.d/evil", b"x")
    evil = yaml.safe_load((project / "params.yaml").read_text())
    evil["data"]["source"] = "evil.zip"
    (project / "evil.yaml").write_text(yaml.safe_dump(evil))
    assert fetch.main(stage_argv("fetch", params="evil.yaml")) == 1
    assert "absolute path" in capsys.readouterr().err
    assert (project / "data/prepared/manifest.csv").read_bytes() == before
    assert [p.name for p in (project / "data").iterdir() if p.name.startswith(".")] == []


def test_split_without_manifest_fails_clearly(project: Path, capsys) -> None:
    assert split.main(stage_argv("split")) == 1
    assert "manifest.csv" in capsys.readouterr().err
