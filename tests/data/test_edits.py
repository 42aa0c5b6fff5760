"""data.exclude and data.relabel: a person's corrections, applied by fetch, keyed to survive
a renamed file, counted, and refused with a clear message when malformed."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pandas as pd
import pytest
from datagen import write_jpeg
from real_config import default_section

from visiontune.config import DataParams
from visiontune.data.manifest import read_manifest, read_table, valid_edit_counts
from visiontune.data.prepare import format_summary, prepare_dataset
from visiontune.data.sources import SourceError
from visiontune.locations import Locator


@pytest.fixture
def source(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    seed = 0
    for split, n in (("train", 3), ("valid", 2)):
        for label in ("cats", "dogs"):
            for i in range(n):
                seed += 1
                write_jpeg(root / split / label / f"{label}{i}.jpg", seed=seed)
    return root


def _fetch(tmp_path: Path, source: Path, **params):
    out = tmp_path / "prepared"
    out.mkdir()
    summary = prepare_dataset(
        default_section(DataParams, source=str(source), mirrors={}, **params),
        out, tmp_path / "downloads", Locator.for_stage(tmp_path, None), seed=0, progress=False,
    )  # fmt: skip
    return summary, read_manifest(out / "manifest.csv"), out


def _id(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_excluded_by_id_survives_a_rename_and_relabel_wins(tmp_path: Path, source: Path):
    moved = source / "train/cats/renamed since the audit.jpg"
    (source / "train/cats/cats0.jpg").rename(moved)
    pd.DataFrame({"id": [_id(moved)], "kind": ["duplicate"]}).to_csv(
        tmp_path / "exclude.csv", index=False
    )
    pd.DataFrame({"path": ["valid/dogs/dogs1.jpg"], "label": ["cats"]}).to_csv(
        tmp_path / "relabel.csv", index=False
    )
    summary, manifest, out = _fetch(tmp_path, source, exclude="exclude.csv", relabel="relabel.csv")
    paths = set(manifest["path"])
    assert "images/train/cats/renamed since the audit.jpg" not in paths
    assert not (out / "images/train/cats/renamed since the audit.jpg").exists()
    relabelled = manifest[manifest["path"] == "images/valid/dogs/dogs1.jpg"]
    assert list(relabelled["label"]) == ["cats"]
    assert summary["edits"] == {"exclude": {"train": 1}, "relabel": {"valid": 1}}
    rejects = read_table(out / "rejects.csv", ("path", "reason"))
    assert rejects["reason"].str.startswith("excluded by data.exclude").sum() == 1
    counts = valid_edit_counts(
        out / "edits.csv", list(manifest["path"][manifest["split_hint"] == "valid"])
    )
    assert counts == {"valid_excluded": 0, "excluded_unsplit": 0, "valid_relabelled": 1}
    lines = format_summary(summary, out / "rejects.csv")
    assert "fetch: 1 images excluded by data.exclude (1 train)" in lines
    assert "fetch: 1 images relabelled by data.relabel (1 valid)" in lines


def test_a_list_of_paths_and_unmatched_entries_are_reported(tmp_path: Path, source: Path):
    summary, manifest, out = _fetch(
        tmp_path, source, exclude=("valid/cats/cats1.jpg", "valid/cats/no such photo.jpg")
    )
    assert "images/valid/cats/cats1.jpg" not in set(manifest["path"])
    assert summary["edits_unmatched"] == ["valid/cats/no such photo.jpg"]
    assert "name no image of the source" in format_summary(summary, out / "rejects.csv")
    counts = valid_edit_counts(out / "edits.csv", [])
    assert counts["valid_excluded"] == 1


@pytest.mark.parametrize(
    ("csv", "what", "message"),
    [
        ("file,why\na.jpg,bad\n", "exclude", "needs an id column"),
        ("path\nvalid/dogs/dogs1.jpg\n", "relabel", "needs a label column"),
        (
            "path,label\nvalid/dogs/dogs1.jpg,cats\nvalid/dogs/dogs0.jpg, \n",
            "relabel",
            "empty label on line 3",
        ),
    ],
)
def test_a_malformed_edit_file_stops_fetch_before_any_work(tmp_path, source, csv, what, message):
    (tmp_path / "edit.csv").write_text(csv)
    with pytest.raises(SourceError, match=message):
        _fetch(tmp_path, source, **{what: "edit.csv"})
    assert not any((tmp_path / "prepared").iterdir())


def test_a_missing_edit_file_names_where_it_was_looked_for(tmp_path, source):
    with pytest.raises(FileNotFoundError, match=r"data\.exclude file not found: gone\.csv"):
        _fetch(tmp_path, source, exclude="gone.csv")
