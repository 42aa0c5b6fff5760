"""Relative paths of params.yaml name the same files in the workspace and in DVC's experiment
copies: found in the checkout first, else in the repo DVC was run from (`$DVC_ROOT`)."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from real_config import default_section

from visiontune.config import DEMO_SOURCE, DataParams
from visiontune.data.prepare import prepare_dataset
from visiontune.data.sources import SourceError
from visiontune.data.stamp import source_stamp
from visiontune.locations import Locator


@pytest.fixture
def layout(tmp_path: Path, make_jpeg: Callable[..., Path]) -> tuple[Path, Path]:
    """A repo with photos beside it (`../photos`) and a temp experiment's copy inside it,
    laid out as `dvc exp run --temp` lays it out: (repo, copy)."""
    for i, label in enumerate(["cats", "cats", "dogs", "dogs"]):
        make_jpeg(tmp_path / "photos" / label / f"{i}.jpg", seed=i)
    (tmp_path / "photos" / "labels.csv").write_text("id,label\n")
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    copy.mkdir(parents=True)
    (repo / "tracked.csv").write_text("id,label\n")
    (copy / "tracked.csv").write_text("id,label\n")
    return repo, copy


def test_a_path_is_found_in_the_copy_first_then_where_dvc_ran(layout) -> None:
    repo, copy = layout
    in_copy = Locator.for_stage(copy, str(repo))
    assert in_copy.in_experiment_copy
    # Part of the experiment's snapshot: the copy's own file.
    tracked = in_copy.locate("tracked.csv", "data.labels")
    assert tracked.path == copy.resolve() / "tracked.csv"
    assert tracked.where == "found in this experiment's copy of the repo"
    # Outside the repo: not in the copy, so the repo DVC was run from.
    photos = in_copy.locate("../photos", "data.source")
    assert photos.path.resolve() == (repo.parent / "photos").resolve()
    assert photos.where.startswith(f"found in {repo.resolve()}, the repo DVC was run from")
    # The workspace: one place, said plainly.
    workspace = Locator.for_stage(repo, str(repo))
    assert not workspace.in_experiment_copy
    assert workspace.locate("../photos", "data.source").where == "found in the repo"
    absolute = workspace.locate(str(repo.parent / "photos"), "data.source")
    assert absolute.where == "used as given"


def test_a_path_found_nowhere_names_both_places(layout) -> None:
    repo, copy = layout
    with pytest.raises(FileNotFoundError) as raised:
        Locator.for_stage(copy, str(repo)).locate("../nowhere", "data.source")
    message = str(raised.value)
    assert message.startswith("data.source not found: ../nowhere (looked for ")
    assert str(copy.resolve() / "../nowhere") in message
    assert str(repo.resolve() / "../nowhere") in message


def test_every_mode_stamps_the_same_files_identically(layout) -> None:
    repo, copy = layout
    params = default_section(
        DataParams, source=DEMO_SOURCE, mirrors={DEMO_SOURCE: ("../photos",)}, labels="labels.csv"
    )
    workspace = source_stamp(params, Locator.for_stage(repo, str(repo)))
    experiment = source_stamp(params, Locator.for_stage(copy, str(repo)))
    assert workspace == experiment
    assert workspace["used"]["path"] == "../photos" and workspace["used"]["files"] == 5
    assert workspace["labels"]["path"] == "labels.csv"  # found inside the source, as fetch does
    # Without DVC_ROOT the copy sees nothing: what the stamp recorded before the fix.
    alone = source_stamp(params, Locator.for_stage(copy, None))
    assert alone["used"] == {"path": DEMO_SOURCE, "kind": "url"}


def test_fetch_in_an_experiment_copy_reads_the_relative_mirror_and_shares_downloads(
    layout, tmp_path: Path
) -> None:
    repo, copy = layout
    params = default_section(DataParams, source=DEMO_SOURCE, mirrors={DEMO_SOURCE: ("../photos",)})
    locate = Locator.for_stage(copy, str(repo))
    out = tmp_path / "out"
    out.mkdir()
    summary = prepare_dataset(params, out, locate.shared("data/downloads"), locate, progress=False,
                              seed=0)  # fmt: skip
    assert summary["images"] == 4
    assert summary["source"]["reason"].startswith(
        f"the local copy of {DEMO_SOURCE} in data.mirrors, found in {repo.resolve()}"
    )
    assert locate.shared("data/downloads") == repo.resolve() / "data/downloads"


def test_a_source_without_images_fails_fetch_naming_what_it_found(tmp_path: Path) -> None:
    source = tmp_path / "photos"
    (source / "notes").mkdir(parents=True)
    (source / "notes" / "readme.txt").write_text("no photos here")
    (source / "IMG_0001.jpg").write_bytes(b"")  # not in a class folder
    params = default_section(DataParams, source=str(source))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SourceError) as raised:
        prepare_dataset(params, out, tmp_path / "dl", Locator.for_stage(tmp_path, None), seed=0,
                        progress=False)  # fmt: skip
    message = str(raised.value)
    assert message.startswith(f"no usable images in {source}")
    assert "looked for a folder per class (<class>/<image>" in message
    assert "its top level holds IMG_0001.jpg, notes/" in message
    assert "rejected: 1 no class folder, 1 not an image" in message
    shutil.rmtree(source / "notes")
    (source / "IMG_0001.jpg").unlink()
    with pytest.raises(SourceError, match="its top level holds nothing"):
        prepare_dataset(params, out, tmp_path / "dl", Locator.for_stage(tmp_path, None), seed=0,
                        progress=False)  # fmt: skip
