"""Find the dataset (folder, archive, URL or a local mirror of that URL) and list its images.

Two layouts are understood: folders per class (below any depth of train/valid/test
folders), and a folder of images plus a CSV of labels. Files that cannot be used are
returned as rejects with a reason, never dropped silently. Unlabelled images in a test
folder (Kaggle's `test/` beside `train/`) are held out: listed apart, to be predicted.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import pandas as pd
from filelock import FileLock

from visiontune.data.archive import ARCHIVE_SUFFIXES, extract_archive, is_archive_name
from visiontune.data.download import DownloadError, cache_name, download, is_url
from visiontune.data.images import is_image_name
from visiontune.fileio import sha256_file
from visiontune.locations import Located, Locator

# Folder names that mark a predefined split (case-insensitive) → the split_hint value.
SPLIT_FOLDERS = {
    "train": "train",
    "training": "train",
    "valid": "valid",
    "validation": "valid",
    "val": "valid",
    "test": "test",
    "testing": "test",
}
# Never dataset content: macOS resource forks in zips, VCS folders, OS junk files.
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Candidate:
    """An image file with its label; `path` is relative to the source root (POSIX)."""

    path: str
    label: str
    split_hint: str


@dataclass(frozen=True)
class Reject:
    path: str
    reason: str
    kind: str  # a short category for the summary counts


@dataclass
class Listing:
    candidates: list[Candidate] = field(default_factory=list)
    rejects: list[Reject] = field(default_factory=list)
    class_folders: set[str] = field(default_factory=set)  # every class folder seen
    layout: str = "folders"
    # Unlabelled images in a test folder: (path from the source root, path in that folder).
    held_out: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ResolvedSource:
    """Where the images were actually read from, and why."""

    requested: str
    used: str  # the mirror, path or URL actually used
    kind: str  # directory | archive | url
    root: Path  # the directory holding the dataset (extracted, for archives)
    archive_sha256: str | None = None
    reason: str = ""  # one phrase: why `used` (a mirror of the URL, as given, downloaded)


class SourceError(ValueError):
    """A source that cannot be used at all (missing, bad CSV columns, ...)."""


def pick_mirror(
    source: str, mirrors: Mapping[str, Sequence[str]], locate: Locator
) -> Located | None:
    """The first existing local copy of `source`; None when `source` has none.

    A mirror stands in only for the URL it copies: a local folder, a CSV or an archive, or
    another URL, is always used as given.
    """
    if not is_url(source):
        return None
    found = (locate.find(mirror) for mirror in mirrors.get(source, ()))
    return next((located for located in found if located is not None), None)


@contextlib.contextmanager
def resolve_source(
    source: str,
    mirrors: Mapping[str, Sequence[str]],
    download_dir: Path,
    locate: Locator,
    *,
    sha256: str | None,
    retries: int,
    timeout_s: float,
) -> Iterator[ResolvedSource]:
    """Use a local copy of the `source` URL when `mirrors` has one, else `source` itself;
    download and extract as needed.

    Relative paths are found by `locate` (the checkout, then the repo DVC was run from).
    Archives are extracted to a temp folder under `download_dir`, removed on exit;
    downloads are cached in `download_dir` so a rerun does not fetch again.
    """
    copies = list(mirrors.get(source, ())) if is_url(source) else []
    mirror = pick_mirror(source, mirrors, locate)
    if mirror is not None:
        used, path = mirror.written, mirror.path
        reason = f"the local copy of {source} in data.mirrors, {mirror.where} (nothing downloaded)"
    elif is_url(source):
        used = source
        target = Path(download_dir) / cache_name(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Experiments run in parallel share this cache: one downloads, the others wait.
        with FileLock(f"{target}.lock"):
            cached = target.is_file()
            path = download(source, target, sha256=sha256, retries=retries, timeout_s=timeout_s)
        reason = f"{'already downloaded' if cached else 'downloaded'} to {target}"
        if copies:
            reason += f" (no data.mirrors copy found: {', '.join(copies)})"
    else:
        located = locate.locate(source, "data.source")
        used, path = source, located.path
        reason = f"data.source, {located.where}"
    kind = "url" if is_url(used) else "directory" if path.is_dir() else "archive"
    if path.is_dir():
        yield ResolvedSource(source, used, kind, path, reason=reason)
        return
    if not is_archive_name(path.name):
        raise SourceError(f"{path}: not a directory or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise DownloadError(f"{path}: sha256 mismatch: expected {sha256}, got {digest}")
    Path(download_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=download_dir))
    try:
        extract_archive(path, tmp)
        yield ResolvedSource(source, used, kind, _unwrap(tmp), digest, reason)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _unwrap(root: Path) -> Path:
    """Descend through lone wrapper folders (`dataset.zip` → `dataset/...`)."""
    while True:
        entries = [p for p in root.iterdir() if not _is_junk(p.name)]
        if len(entries) != 1 or not entries[0].is_dir():
            return root
        root = entries[0]


def _is_junk(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_NAMES


def _walk(root: Path) -> Iterator[tuple[tuple[str, ...], list[str], list[str]]]:
    """Sorted walk yielding (relative dir parts, subdirs, files), skipping junk."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _is_junk(d))
        rel = Path(dirpath).relative_to(root).parts
        yield rel, dirnames, sorted(f for f in filenames if not _is_junk(f))


def _split_hint(parts: Sequence[str]) -> str:
    hints = [SPLIT_FOLDERS[p.lower()] for p in parts if p.lower() in SPLIT_FOLDERS]
    return hints[-1] if hints else ""


def _in_test_folder(parts: Sequence[str]) -> str | None:
    """The path below the last test folder among `parts` (a file's folders + its name),
    or None when the file is not in one."""
    for i in range(len(parts) - 2, -1, -1):
        if SPLIT_FOLDERS.get(parts[i].lower()) == "test":
            return PurePosixPath(*parts[i + 1 :]).as_posix()
        if parts[i].lower() in SPLIT_FOLDERS:
            return None
    return None


def list_folders(root: Path) -> Listing:
    """List a folder-per-class tree: the label is the image's parent folder name."""
    listing = Listing(layout="folders")
    for rel, subdirs, files in _walk(root):
        in_class = bool(rel) and rel[-1].lower() not in SPLIT_FOLDERS
        if in_class and not subdirs:
            listing.class_folders.add(rel[-1])
        for name in files:
            path = PurePosixPath(*rel, name).as_posix()
            if not is_image_name(name):
                if in_class:
                    suffix = Path(name).suffix or "none"
                    reason = f"not an image file name (suffix {suffix})"
                    listing.rejects.append(Reject(path, reason, "not an image"))
                continue
            held = _in_test_folder((*rel, name)) if not in_class else None
            if held is not None:
                listing.held_out.append((path, held))
                continue
            if not in_class:
                where = f"directly in split folder {rel[-1]!r}" if rel else "at the top level"
                reason = f"not inside a class folder ({where})"
                listing.rejects.append(Reject(path, reason, "no class folder"))
                continue
            listing.candidates.append(Candidate(path, rel[-1], _split_hint(rel[:-1])))
    return listing


def resolve_labels_path(labels: str, root: Path, locate: Locator) -> Path:
    """`labels` inside the source root, else where `locate` finds it (absolute: as given)."""
    inside = root / labels
    if inside.is_file():  # an absolute `labels` ignores `root`
        return inside
    try:
        found = locate.locate(labels, "data.labels")
    except FileNotFoundError as exc:
        raise SourceError(f"{exc}, nor in the source {root}") from None
    if not found.path.is_file():
        raise SourceError(f"data.labels is not a file: {found.path}")
    return found.path


def list_labelled(root: Path, labels_csv: Path, id_column: str, label_column: str) -> Listing:
    """List images named by a labels CSV (ids: relative paths, file names or stems)."""
    table = pd.read_csv(labels_csv, dtype=str, keep_default_na=False, na_filter=False)
    missing = [c for c in (id_column, label_column) if c not in table.columns]
    if missing:
        raise SourceError(
            f"{labels_csv}: no column(s) {', '.join(missing)}; it has "
            f"{', '.join(map(str, table.columns))} (set data.id_column / data.label_column)"
        )
    listing = Listing(layout="labels_csv")
    images = [
        PurePosixPath(*rel, name).as_posix()
        for rel, _, files in _walk(root)
        for name in files
        if is_image_name(name)
    ]
    index: dict[str, list[str]] = {}
    for path in images:
        pure = PurePosixPath(path)
        for key in {path, pure.name, pure.stem, pure.with_suffix("").as_posix()}:
            index.setdefault(key, []).append(path)
    csv_name = labels_csv.name
    rows: dict[str, list[tuple[int, str]]] = {}  # image path → [(line, label)]
    pairs = zip(table[id_column], table[label_column], strict=True)
    for offset, (raw_id, raw_label) in enumerate(pairs):
        line = offset + 2  # 1-based, after the header
        image_id, label = raw_id.strip(), raw_label.strip()
        if not image_id:
            listing.rejects.append(Reject(f"{csv_name}:{line}", "empty id", "bad csv row"))
            continue
        matches = _match(image_id, index)
        if not matches:
            reason = f"listed in {csv_name} (line {line}) but no such image file"
            listing.rejects.append(Reject(image_id, reason, "unknown id"))
        elif len(matches) > 1:
            shown = ", ".join(matches[:3])
            reason = f"id matches {len(matches)} files ({shown}); use the relative path as id"
            listing.rejects.append(Reject(image_id, reason, "ambiguous id"))
        else:
            rows.setdefault(matches[0], []).append((line, label))
    for path in images:
        entries = rows.get(path)
        held = _in_test_folder(PurePosixPath(path).parts)
        if entries is None and held is not None:
            listing.held_out.append((path, held))
            continue
        if entries is None:
            reason = f"not listed in {csv_name}"
            listing.rejects.append(Reject(path, reason, "unlabelled"))
            continue
        labels = sorted({label for _, label in entries})
        if len(labels) > 1:
            detail = ", ".join(f"{label!r} (line {line})" for line, label in entries)
            reason = f"conflicting labels in {csv_name}: {detail}"
            listing.rejects.append(Reject(path, reason, "conflicting labels"))
        elif not labels[0]:
            reason = f"empty label in {csv_name} (line {entries[0][0]})"
            listing.rejects.append(Reject(path, reason, "unlabelled"))
        else:
            hint = _split_hint(PurePosixPath(path).parts[:-1])
            listing.candidates.append(Candidate(path, labels[0], hint))
            for line, _ in entries[1:]:
                reason = f"repeated id in {csv_name} (line {line}, same label; row ignored)"
                listing.rejects.append(Reject(f"{csv_name}:{line}", reason, "repeated id"))
    return listing


def _match(image_id: str, index: dict[str, list[str]]) -> list[str]:
    key = image_id.replace("\\", "/").removeprefix("./")
    # An id that names a file (with extension) only matches that name, never a stem.
    if is_image_name(key):
        return [p for p in index.get(key, []) if p == key or PurePosixPath(p).name == key]
    return [
        p
        for p in index.get(key, [])
        if PurePosixPath(p).stem == key or PurePosixPath(p).with_suffix("").as_posix() == key
    ]
