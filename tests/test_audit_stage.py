"""The audit on real photos with planted errors, and the round trip a user makes: the audit
flags a leak across the split, its rows go into data.exclude (with docs/data.md's own
command), and the next run keeps those images out and finds no leak."""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import subprocess
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from doc_pages import bash_lines
from PIL import Image
from project_copy import SMALL_OVERRIDES, deep_merge, stage_argv

from visiontune.data.manifest import read_manifest

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[1]
STAGES = ("fetch", "split", "precompute", "audit")


def _main(stage: str):
    spec = importlib.util.spec_from_file_location(f"{stage}_stage", REPO / "stages" / f"{stage}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _near_copy(source: Path, target: Path) -> None:
    """A resized, re-encoded copy: what a scraper or a second upload leaves behind."""
    with Image.open(source) as image:
        image = image.convert("RGB")
        image = image.resize((image.width * 3 // 4, image.height * 3 // 4), Image.LANCZOS)
        out = io.BytesIO()
        image.save(out, "JPEG", quality=75)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(out.getvalue())


@pytest.fixture
def project(tmp_path: Path, dogscats: Path, monkeypatch) -> Path:
    """16 train and 8 valid real photos per class, with 3 train photos copied into valid,
    one file twice in train, and 2 cats filed as dogs."""
    photos = tmp_path / "photos"
    for part, count in (("train", 16), ("valid", 8)):
        for label in ("cats", "dogs"):
            for file in sorted((dogscats / part / label).glob("*.jpg"))[:count]:
                target = photos / part / label / file.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(file, target)
    for name in ("cat.1.jpg", "cat.10.jpg"):
        (photos / "train/cats" / name).rename(photos / "train/dogs" / name)
    for original in ("train/cats/cat.100.jpg", "train/dogs/dog.1.jpg", "train/dogs/dog.10.jpg"):
        part, label, name = original.split("/")
        _near_copy(photos / original, photos / "valid" / label / f"again {name}")
    shutil.copyfile(photos / "train/dogs/dog.100.jpg", photos / "train/dogs/same again.jpg")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    overrides = {k: v for k, v in SMALL_OVERRIDES.items() if k != "data"}
    params = deep_merge(params, {**overrides, "data": {"source": "photos", "mirrors": {}}})
    params["runtime"]["num_workers"] = 0
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(project: Path, capsys) -> str:
    for stage in STAGES:
        assert _main(stage)(stage_argv(stage, REPO)) == 0, stage
    return capsys.readouterr().out


def test_audit_finds_the_planted_errors_and_exclusion_ends_the_leak(project: Path, capsys):
    out = _run(project, capsys)
    findings = pd.read_csv(project / "outputs/audit/findings.csv", dtype=str,
                           keep_default_na=False)  # fmt: skip
    identical = findings[findings["other_split"] == "dropped by fetch"]
    assert identical[["kind", "path", "other_path", "score"]].values.tolist() == [
        ["duplicate", "train/dogs/dog.100.jpg", "train/dogs/same again.jpg", "1.0"]
    ]
    pairs = findings[
        (findings["kind"] == "duplicate") & (findings["other_split"] != "dropped by fetch")
    ]
    planted = {
        frozenset({"train/cats/cat.100.jpg", "valid/cats/again cat.100.jpg"}),
        frozenset({"train/dogs/dog.1.jpg", "valid/dogs/again dog.1.jpg"}),
        frozenset({"train/dogs/dog.10.jpg", "valid/dogs/again dog.10.jpg"}),
    }
    found = {frozenset(p) for p in zip(pairs["path"], pairs["other_path"], strict=True)}
    assert found == planted
    labels = findings[findings["kind"] == "label"]
    flips = labels[labels["path"].isin(["train/dogs/cat.1.jpg", "train/dogs/cat.10.jpg"])]
    assert len(flips) == 2 and set(flips["suggested_label"]) == {"cats"}
    metrics = json.loads((project / "outputs/audit/metrics.json").read_text())
    assert metrics["duplicate_pairs_across_splits"] == 3
    assert metrics["label_issues"] == len(labels)
    assert f"audit: {metrics['label_issues']} suspect labels" in out
    assert "3 duplicate pairs (3 across train/valid)" in out
    assert "1 identical files fetch dropped" in out
    for picture in ("suspect_labels.png", "duplicates.png", "outliers.png"):
        assert Image.open(project / "outputs/audit" / picture).size[0] > 200

    # The stage's MLflow run holds its counts and its files.
    runs = mlflow.search_runs(
        experiment_names=["visiontune"], filter_string="tags.`visiontune.stage` = 'audit'"
    )
    assert runs["metrics.audit/duplicate_pairs_across_splits"].iloc[0] == 3
    artifacts = mlflow.artifacts.list_artifacts(
        run_id=runs["run_id"].iloc[0], artifact_path="audit"
    )
    assert {"findings.csv", "duplicates.png"} <= {Path(a.path).name for a in artifacts}

    # docs/data.md's command, as written, picks the leaking pairs for data.exclude.
    (line,) = [c for c in bash_lines("data.md") if c.startswith("grep") and "exclude.csv" in c]
    (project / "data").mkdir(exist_ok=True)
    subprocess.run(["bash", "-c", line], cwd=project, check=True)
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["data"]["exclude"] = "data/exclude.csv"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    out = _run(project, capsys)
    assert "fetch: 3 images excluded by data.exclude (3 train)" in out
    manifest = set(read_manifest(project / "data/prepared/manifest.csv")["path"])
    assert not {f"images/{path}" for path in pairs["path"]} & manifest
    metrics = json.loads((project / "outputs/audit/metrics.json").read_text())
    assert metrics["duplicate_pairs_across_splits"] == 0
    assert metrics["duplicate_pairs"] == 0
