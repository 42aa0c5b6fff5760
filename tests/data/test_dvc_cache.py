"""`dvc repro fetch` on real photos: the prepared images cost no second copy in .dvc/cache,
and a source file changed in place re-runs fetch without touching the cached old version."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
from project_copy import dvc, make_project

pytestmark = pytest.mark.slow


def disk_bytes(*roots: Path) -> int:
    """Bytes of the files under `roots`, each inode counted once (as `du` does)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root in roots:
        for path in root.rglob("*"):
            stat = path.lstat()
            if path.is_file() and not path.is_symlink() and (stat.st_dev, stat.st_ino) not in seen:
                seen.add((stat.st_dev, stat.st_ino))
                total += stat.st_size
    return total


def test_linked_cache_stores_the_photos_once_and_sees_in_place_edits(
    dogscats: Path, tmp_path: Path
) -> None:
    source = tmp_path / "photos"
    for label in ("cats", "dogs"):
        (source / label).mkdir(parents=True)
        for photo in sorted((dogscats / "train" / label).glob("*.jpg"))[:15]:
            shutil.copy2(photo, source / label / photo.name)
    source_bytes = disk_bytes(source)
    project = make_project(
        tmp_path / "project",
        {"data": {"source": str(source), "max_per_class": None}, "tracking": {"enabled": False}},
    )
    dvc(project, "repro", "fetch")
    prepared, cache = project / "data" / "prepared", project / ".dvc" / "cache"

    # Every prepared image is a hardlink into the cache: the bytes are stored once.
    images = sorted((prepared / "images").rglob("*.jpg"))
    assert len(images) == 30
    assert all(image.stat().st_nlink == 2 for image in images)
    assert disk_bytes(prepared, cache) <= 1.1 * source_bytes
    assert "Data and pipelines are up to date" not in dvc(project, "status").stdout
    assert "always changed" in dvc(project, "status", "source_stamp").stdout
    assert dvc(project, "status", "fetch").stdout.strip() == "Data and pipelines are up to date."

    # Nothing changed: the stamp is rewritten with the same bytes and fetch is skipped.
    assert "Stage 'fetch' didn't change" in dvc(project, "repro", "fetch").stdout
    dvc(project, "repro", "source_stamp")
    assert dvc(project, "status", "fetch").stdout.strip() == "Data and pipelines are up to date."

    # A photo replaced in place (same name): fetch re-runs and copies the new bytes; the
    # cached old version is intact, since fetch copies from the source and never links it.
    edited = source / "cats" / images[0].name
    old_md5 = hashlib.md5(edited.read_bytes()).hexdigest()
    replacement = sorted((dogscats / "valid" / "cats").glob("*.jpg"))[0]
    edited.write_bytes(replacement.read_bytes())
    os.utime(edited, ns=(edited.stat().st_atime_ns, edited.stat().st_mtime_ns + 10**9))
    dvc(project, "repro", "source_stamp")  # `dvc status` now tells that fetch would run
    assert "data/source_stamp.json" in dvc(project, "status", "fetch").stdout
    rerun = dvc(project, "repro", "fetch").stdout
    assert "Running stage 'fetch'" in rerun
    assert (prepared / "images" / "cats" / edited.name).read_bytes() == replacement.read_bytes()
    old_object = cache / "files" / "md5" / old_md5[:2] / old_md5[2:]
    assert hashlib.md5(old_object.read_bytes()).hexdigest() == old_md5
    assert "Stage 'fetch' didn't change" in dvc(project, "repro", "fetch").stdout

    # The old version stays cached until `dvc gc -w`; `dvc unprotect` turns links into copies.
    dvc(project, "gc", "-w", "-f")
    assert not old_object.exists()
    dvc(project, "unprotect", "data/prepared")
    assert all(image.stat().st_nlink == 1 for image in (prepared / "images").rglob("*.jpg"))
