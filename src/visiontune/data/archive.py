"""Safe extraction of dataset archives: before anything is written, absolute paths, `..`,
links leaving the target and device files are refused with an error naming the member."""

from __future__ import annotations

import shutil
import stat
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")


class ArchiveError(ValueError):
    """An archive that cannot be extracted (corrupt, unsupported, or unsafe)."""


class UnsafeArchiveError(ArchiveError):
    """An archive member that would be written outside the target, or is not a plain file."""


def is_archive_name(name: str | Path) -> bool:
    return str(name).lower().endswith(ARCHIVE_SUFFIXES)


def extract_archive(archive: Path, dest: Path) -> None:
    """Check every member of `archive`, then extract it into `dest` (created if needed);
    UnsafeArchiveError, with nothing extracted, when a member is unsafe."""
    dest.mkdir(parents=True, exist_ok=True)
    if archive.name.lower().endswith(".zip"):
        _extract_zip(archive, dest)
    elif is_archive_name(archive.name):
        _extract_tar(archive, dest)
    else:
        raise ArchiveError(f"{archive}: not a supported archive ({', '.join(ARCHIVE_SUFFIXES)})")


def _check_member_name(archive: Path, name: str) -> None:
    # Backslashes are path separators to the Windows tools that made many zips; tar's
    # 'data' filter would strip a leading / rather than refuse it.
    normalised = name.replace("\\", "/")
    if normalised.startswith("/") or (len(normalised) > 1 and normalised[1] == ":"):
        raise UnsafeArchiveError(f"{archive}: member {name!r} has an absolute path; refusing")
    if ".." in PurePosixPath(normalised).parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} contains '..' (path traversal); refusing"
        )


def _check_space(archive: Path, dest: Path, total_bytes: int) -> None:
    free = shutil.disk_usage(dest).free
    if total_bytes > free:
        raise ArchiveError(
            f"{archive}: extracting needs {total_bytes / 2**20:.0f} MiB but only "
            f"{free / 2**20:.0f} MiB is free under {dest}"
        )


def _extract_zip(archive: Path, dest: Path) -> None:
    try:
        handle = zipfile.ZipFile(archive)
    except zipfile.BadZipFile as exc:
        raise ArchiveError(f"{archive}: not a valid zip archive ({exc})") from None
    with handle:
        root = dest.resolve()
        for info in handle.infolist():
            _check_member_name(archive, info.filename)
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind == stat.S_IFLNK:
                target = handle.read(info).decode("utf-8", errors="replace")
                if not ((root / info.filename).parent / target).resolve().is_relative_to(root):
                    raise UnsafeArchiveError(
                        f"{archive}: member {info.filename!r} is a link to {target!r} "
                        "outside the extraction directory; refusing"
                    )
            elif kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeArchiveError(
                    f"{archive}: member {info.filename!r} is a special file; refusing"
                )
        _check_space(archive, dest, sum(info.file_size for info in handle.infolist()))
        # zipfile writes link members as small regular files (never as links), so
        # after the checks above plain extraction cannot leave `dest`.
        handle.extractall(dest)


def _extract_tar(archive: Path, dest: Path) -> None:
    try:
        handle = tarfile.open(archive)  # noqa: SIM115 (closed by the `with` below)
    except (tarfile.TarError, OSError) as exc:
        raise ArchiveError(f"{archive}: not a valid tar archive ({exc})") from None
    with handle:
        root = str(dest.resolve())
        for member in handle.getmembers():
            _check_member_name(archive, member.name)
            try:
                # Python's 'data' filter refuses links leaving the target, devices and fifos.
                tarfile.data_filter(member, root)
            except tarfile.FilterError as exc:
                raise UnsafeArchiveError(
                    f"{archive}: member {member.name!r}: {exc}; refusing"
                ) from None
        _check_space(archive, dest, sum(m.size for m in handle.getmembers() if m.isfile()))
        handle.extractall(dest, filter="data")
