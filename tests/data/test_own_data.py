"""A newcomer's own photos with the shipped params.yaml: only `data.source` (and, for a CSV,
`labels` and `label_column`) edited, `data.mirrors` left as shipped while the demo mirror
exists. The fetch stage, run as DVC runs it, fetches those photos and prints only its own
lines: no Python warning, no MLflow INFO line on its (fresh) tracking store."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from project_copy import REPO_ROOT, project_env

from visiontune.data.manifest import read_manifest


def edit_params(project: Path, **values: str) -> None:
    """What the README asks of a user: edit these lines of the `data` section in place."""
    text = (REPO_ROOT / "params.yaml").read_text(encoding="utf-8")
    for key, value in values.items():
        text, found = re.subn(rf"(?m)^  {key}: .*$", f"  {key}: {value}", text)
        assert found == 1, key
    (project / "params.yaml").write_text(text, encoding="utf-8")


@pytest.mark.parametrize(
    "layout",
    ["folders", pytest.param("labels_csv", marks=pytest.mark.slow)],  # ~10 s each
)
def test_own_photos_are_fetched_and_the_stage_prints_only_its_own_lines(
    tmp_path: Path, make_jpeg: Callable[..., Path], layout: str
) -> None:
    # The demo mirror where the shipped params.yaml looks for it, relative to the project.
    for label in ("cats", "dogs"):
        make_jpeg(tmp_path / "shared/data/dogscats/train" / label / "demo.jpg", seed=len(label))
    project = tmp_path / "project"
    project.mkdir()
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    photos = tmp_path / "my photos"
    labels = {f"p{i}": ("tabby", "siamese")[i % 2] for i in range(6)}
    if layout == "folders":
        for i, (name, label) in enumerate(labels.items()):
            make_jpeg(photos / label / f"{name}.jpg", seed=100 + i)
        (photos / "tabby" / "broken.jpg").write_bytes(b"")
        edit_params(project, source="../my photos")
    else:
        for i, name in enumerate(labels):
            make_jpeg(photos / "train" / f"{name}.jpg", seed=100 + i)
        (photos / "train" / "broken.jpg").write_bytes(b"")
        rows = "".join(f"{name},{label}\n" for name, label in labels.items())
        (photos / "labels.csv").write_text(f"id,breed\n{rows}broken,tabby\n")
        edit_params(project, source="../my photos", labels="labels.csv", label_column="breed")

    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "stages/fetch.py"), "--params", "params.yaml",
         "--out", "data/prepared", "--download-dir", "data/downloads"],
        cwd=project, env=project_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    manifest = read_manifest(project / "data/prepared/manifest.csv")
    assert sorted(manifest["label"]) == sorted(labels.values())
    assert all(Path(p).stem in labels for p in manifest["path"])
    kind = "a folder per class" if layout == "folders" else "images + a labels CSV"
    assert f"fetch: source ../my photos ({kind}): data.source, found in the repo" in result.stdout
    assert "1 files rejected (1 unreadable)" in result.stdout  # real problems still show
    outputs = "config.json, edits.csv, images/, manifest.csv, rejects.csv"
    assert result.stdout.splitlines()[-1] == f"fetch: wrote data/prepared/: {outputs}"
    # Nothing else: no runpy RuntimeWarning, no "Creating initial MLflow database tables".
    assert result.stderr == "", result.stderr
    assert (project / "mlflow.db").is_file(), "the stage was tracked"
