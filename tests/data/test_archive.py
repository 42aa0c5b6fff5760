"""Archive extraction refuses traversal, absolute paths, escaping links and device files."""

from __future__ import annotations

import io
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest

from visiontune.data.archive import ArchiveError, UnsafeArchiveError, extract_archive


def _zip(path: Path, members: dict[str, bytes], links: dict[str, str] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
        for name, target in (links or {}).items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            archive.writestr(info, target)
    return path


def _tar(path: Path, build) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as archive:
        build(archive)
    return path


def _add_file(archive: tarfile.TarFile, name: str, data: bytes = b"x") -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _add_special(archive: tarfile.TarFile, name: str, kind: bytes, target: str = "") -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    archive.addfile(info)


def test_safe_zip_and_tgz_extract(tmp_path: Path) -> None:
    members = {"set/train/cats/a.jpg": b"a", "set/valid/dogs/b b.jpg": b"b"}
    extract_archive(_zip(tmp_path / "ok.zip", members), tmp_path / "z")
    assert (tmp_path / "z/set/valid/dogs/b b.jpg").read_bytes() == b"b"

    def build(archive: tarfile.TarFile) -> None:
        _add_file(archive, "set/cats/ü.jpg", b"u")
        _add_special(archive, "set/cats/link.jpg", tarfile.SYMTYPE, "ü.jpg")  # stays inside

    extract_archive(_tar(tmp_path / "ok.tgz", build), tmp_path / "t")
    assert (tmp_path / "t/set/cats/link.jpg").read_bytes() == b"u"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("../evil.jpg", "'..'"),
        ("set/../../evil.jpg", "'..'"),
        ("..\\evil.jpg", "'..'"),
        ("/etc/evil.jpg", "absolute"),
        ("C:/evil.jpg", "absolute"),
    ],
)
def test_zip_traversal_and_absolute_members_are_refused(
    tmp_path: Path, name: str, message: str
) -> None:
    archive = _zip(tmp_path / "bad.zip", {"set/ok.jpg": b"ok", name: b"evil"})
    with pytest.raises(UnsafeArchiveError, match=message) as info:
        extract_archive(archive, tmp_path / "out")
    assert repr(name) in str(info.value)
    assert not any((tmp_path / "out").rglob("*")), "nothing is extracted from an unsafe archive"
    assert not (tmp_path / "evil.jpg").exists()


def test_zip_symlink_leaving_the_target_is_refused(tmp_path: Path) -> None:
    archive = _zip(tmp_path / "link.zip", {"a/x.jpg": b"x"}, links={"a/y.jpg": "../../../etc"})
    with pytest.raises(UnsafeArchiveError, match="link"):
        extract_archive(archive, tmp_path / "out")


@pytest.mark.parametrize(
    ("kind", "target", "message"),
    [
        (tarfile.SYMTYPE, "/etc/passwd", "link"),
        (tarfile.SYMTYPE, "../../outside", "outside"),
        (tarfile.LNKTYPE, "../outside", "outside"),
        (tarfile.CHRTYPE, "", "special file"),
        (tarfile.FIFOTYPE, "", "special file"),
    ],
)
def test_tar_links_leaving_the_target_and_device_files_are_refused(
    tmp_path: Path, kind: bytes, target: str, message: str
) -> None:
    def build(archive: tarfile.TarFile) -> None:
        _add_file(archive, "set/ok.jpg")
        _add_special(archive, "set/bad", kind, target)

    with pytest.raises(UnsafeArchiveError, match=message) as info:
        extract_archive(_tar(tmp_path / "bad.tar", build), tmp_path / "out")
    assert "set/bad" in str(info.value)
    assert not any((tmp_path / "out").rglob("*"))


def test_tar_traversal_and_absolute_names_are_refused(tmp_path: Path) -> None:
    for name in ("../evil.jpg", "/tmp/evil.jpg"):
        archive = _tar(tmp_path / "bad.tar.gz", lambda a, n=name: _add_file(a, n))
        with pytest.raises(UnsafeArchiveError, match="refusing"):
            extract_archive(archive, tmp_path / "out")


def test_corrupt_or_unsupported_archives_give_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "broken.zip").write_bytes(b"PK\x03\x04 not really")
    with pytest.raises(ArchiveError, match="not a valid zip"):
        extract_archive(tmp_path / "broken.zip", tmp_path / "out")
    (tmp_path / "broken.tgz").write_bytes(b"\x1f\x8b garbage")
    with pytest.raises(ArchiveError, match="not a valid tar"):
        extract_archive(tmp_path / "broken.tgz", tmp_path / "out")
    (tmp_path / "data.rar").write_bytes(b"x")
    with pytest.raises(ArchiveError, match="not a supported archive"):
        extract_archive(tmp_path / "data.rar", tmp_path / "out")
