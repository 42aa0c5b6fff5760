"""The source stamp changes when a file of a local source changes in place, and only then."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from real_config import default_section

from visiontune.config import DEMO_SOURCE, DataParams
from visiontune.data.stamp import source_stamp
from visiontune.locations import Locator

HERE = Locator.for_stage(Path.cwd(), None)


def _photos(dogscats: Path, dest: Path, n: int = 6) -> Path:
    """A small folder-per-class source of real photos (copied: the test edits them)."""
    for label in ("cats", "dogs"):
        for photo in sorted((dogscats / "train" / label).glob("*.jpg"))[:n]:
            (dest / label).mkdir(parents=True, exist_ok=True)
            shutil.copy2(photo, dest / label / photo.name)
    return dest


def _digest(params: DataParams) -> str:
    return source_stamp(params, HERE)["used"]["digest"]


def test_stamp_is_stable_and_sees_in_place_edits(dogscats: Path, tmp_path: Path) -> None:
    source = _photos(dogscats, tmp_path / "photos")
    params = default_section(DataParams, source=str(source))
    first = source_stamp(params, HERE)
    assert first == source_stamp(params, HERE)  # nothing changed: the same bytes, fetch skipped
    assert first["used"]["files"] == 12
    assert first["used"]["bytes"] == sum(p.stat().st_size for p in source.rglob("*.jpg"))

    # The same file name, other bytes of the same size: only the mtime tells.
    cat = sorted((source / "cats").iterdir())[0]
    data = bytearray(cat.read_bytes())
    data[-3] ^= 0xFF
    stat = cat.stat()
    cat.write_bytes(bytes(data))
    os.utime(cat, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    edited = _digest(params)
    assert edited != first["used"]["digest"]

    # A new file, then a removed one.
    shutil.copy2(cat, source / "dogs" / "new.jpg")
    added = _digest(params)
    assert added != edited
    (source / "dogs" / "new.jpg").unlink()
    assert _digest(params) == edited


def test_stamp_of_a_url_its_mirror_an_archive_and_labels(dogscats: Path, tmp_path: Path) -> None:
    # A URL without a local copy stands for itself (its content is data.sha256's job).
    url = default_section(DataParams, source="https://example.com/photos.zip", mirrors={})
    assert source_stamp(url, HERE)["used"] == {
        "path": "https://example.com/photos.zip",
        "kind": "url",
    }

    # The URL's mirror is what fetch reads, so it is what is stamped.
    mirror = _photos(dogscats, tmp_path / "mirror", n=2)
    mirrored = default_section(
        DataParams, source=DEMO_SOURCE, mirrors={DEMO_SOURCE: (str(mirror),)}
    )
    assert source_stamp(mirrored, HERE)["used"]["files"] == 4

    # An archive is one file; a labels CSV outside the source is stamped too.
    archive = Path(shutil.make_archive(str(tmp_path / "photos"), "zip", mirror))
    labels = tmp_path / "labels.csv"
    labels.write_text("id,label\n")
    params = default_section(DataParams, source=str(archive), labels=str(labels))
    before = source_stamp(params, HERE)
    assert before["used"]["kind"] == "file" and before["labels"]["files"] == 1
    time.sleep(0.01)
    labels.write_text("id,label\ncat.1,cats\n")
    assert source_stamp(params, HERE)["labels"] != before["labels"]
    assert source_stamp(params, HERE)["used"] == before["used"]

    # A missing source is no error here: fetch itself reports it.
    missing = default_section(DataParams, source=str(tmp_path / "nowhere"))
    assert source_stamp(missing, HERE)["used"]["kind"] == "missing"
