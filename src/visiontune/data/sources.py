"""Find the dataset (folder, archive, URL or a local mirror of that URL) and list its images.

Two layouts: folders per class (below any depth of train/valid/test folders), and a folder of
images plus a CSV of labels. Unusable files become rejects with a reason, never dropped
silently; unlabelled images in a test folder (Kaggle's `test/`) are held out, to be predicted.
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

from visiontune.config import DataParams
from visiontune.data.archive import ARCHIVE_SUFFIXES, extract_archive, is_archive_name
from visiontune.data.download import DownloadError, cache_name, download, is_url
from visiontune.data.images import is_image_name
from visiontune.fileio import sha256_file
from visiontune.locations import Located, Locator

# Folder names that mark a predefined split (case-insensitive) → the split_hint value.
SPLIT_FOLDERS = (
    dict.fromkeys(("train", "training"), "train")
    | dict.fromkeys(("valid", "validation", "val"), "valid")
    | dict.fromkeys(("test", "testing"), "test")
)
# Never dataset content: macOS resource forks in zips, OS junk files (and dot-files).
_JUNK_NAMES = frozenset({"__MACOSX", "Thumbs.db", "desktop.ini"})


@dataclass(frozen=True)
class Candidate:
    path: str  # of the image file, relative to the source root (POSIX)
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
    """The first existing local copy of `source` (a URL: config keys `mirrors` by URL), if any."""
    return next(filter(None, map(locate.find, mirrors.get(source, ()))), None)


@contextlib.contextmanager
def resolve_source(
    params: DataParams, download_dir: Path, locate: Locator
) -> Iterator[ResolvedSource]:
    """`data.source`'s local mirror, else the source itself: downloaded to the cache
    `download_dir`, and an archive extracted to a temp folder there (removed on exit)."""
    source, sha256 = params.source, params.sha256
    mirror = pick_mirror(source, params.mirrors, locate)
    if mirror is not None:
        used, path = mirror.written, mirror.path
        reason = f"the local copy of {source} in data.mirrors, {mirror.where} (nothing downloaded)"
    elif is_url(source):
        used = source
        target = download_dir / cache_name(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Experiments run in parallel share this cache: one downloads, the others wait.
        with FileLock(f"{target}.lock"):
            cached = target.is_file()
            path = download(
                source,
                target,
                sha256=sha256,
                retries=params.download_retries,
                timeout_s=params.download_timeout_s,
            )
        reason = f"{'already downloaded' if cached else 'downloaded'} to {target}"
        if params.mirrors.get(source):
            reason += f" (no data.mirrors copy found: {', '.join(params.mirrors[source])})"
    else:
        located = locate.locate(source, "data.source")
        used, path = source, located.path
        reason = f"data.source, {located.where}"
    kind = "url" if is_url(used) else "directory" if path.is_dir() else "archive"
    if path.is_dir():
        yield ResolvedSource(used, kind, path, reason=reason)
        return
    if not is_archive_name(path.name):
        raise SourceError(f"{path}: not a directory or an archive ({', '.join(ARCHIVE_SUFFIXES)})")
    digest = sha256_file(path)
    if sha256 is not None and digest != sha256:
        raise DownloadError(f"{path}: sha256 mismatch: expected {sha256}, got {digest}")
    download_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=download_dir))
    try:
        extract_archive(path, tmp)
        yield ResolvedSource(used, kind, _unwrap(tmp), digest, reason)
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


def _split_of(parts: Sequence[str]) -> tuple[str, str]:
    """The hint of the last split folder among a file's folders, and the file's path below it."""
    for i in range(len(parts) - 2, -1, -1):
        if parts[i].lower() in SPLIT_FOLDERS:
            return SPLIT_FOLDERS[parts[i].lower()], "/".join(parts[i + 1 :])
    return "", "/".join(parts)


def list_folders(root: Path) -> Listing:
    """List a folder-per-class tree: the label is the image's parent folder name."""
    listing = Listing()
    for rel, subdirs, files in _walk(root):
        in_class = bool(rel) and rel[-1].lower() not in SPLIT_FOLDERS
        if in_class and not subdirs:
            listing.class_folders.add(rel[-1])
        for name in files:
            path = PurePosixPath(*rel, name).as_posix()
            hint, below = _split_of((*rel, name))
            if not is_image_name(name):
                if in_class:
                    suffix = Path(name).suffix or "none"
                    reason = f"not an image file name (suffix {suffix})"
                    listing.rejects.append(Reject(path, reason, "not an image"))
            elif in_class:
                listing.candidates.append(Candidate(path, rel[-1], hint))
            elif hint == "test":
                listing.held_out.append((path, below))
            else:
                where = f"directly in split folder {rel[-1]!r}" if rel else "at the top level"
                reason = f"not inside a class folder ({where})"
                listing.rejects.append(Reject(path, reason, "no class folder"))
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
    table = pd.read_csv(labels_csv, dtype=str, na_filter=False)
    missing = [c for c in (id_column, label_column) if c not in table.columns]
    if missing:
        raise SourceError(
            f"{labels_csv}: no column(s) {', '.join(missing)}; it has "
            f"{', '.join(map(str, table.columns))} (set data.id_column / data.label_column)"
        )
    listing = Listing(layout="labels_csv")
    images = [PurePosixPath(*rel, name) for rel, _, files in _walk(root) for name in files]
    images = [image for image in images if is_image_name(image.name)]
    index: dict[str, list[str]] = {}  # each path, file name and stem → the paths it names
    for image in images:
        stems = {image.stem, image.with_suffix("").as_posix()}
        # An id with an image suffix names a file: "a.jpg" is not the stem of "a.jpg.png".
        for key in {image.as_posix(), image.name} | {s for s in stems if not is_image_name(s)}:
            index.setdefault(key, []).append(image.as_posix())
    csv_name = labels_csv.name
    rows: dict[str, list[tuple[int, str]]] = {}  # image path → [(line, label)]
    pairs = zip(table[id_column], table[label_column], strict=True)
    for line, (raw_id, raw_label) in enumerate(pairs, start=2):  # line 1 is the header
        image_id, label = raw_id.strip(), raw_label.strip()
        matches = index.get(image_id.replace("\\", "/").removeprefix("./"), [])
        if not image_id:
            listing.rejects.append(Reject(f"{csv_name}:{line}", "empty id", "bad csv row"))
        elif not matches:
            reason = f"listed in {csv_name} (line {line}) but no such image file"
            listing.rejects.append(Reject(image_id, reason, "unknown id"))
        elif len(matches) > 1:
            shown = ", ".join(matches[:3])
            reason = f"id matches {len(matches)} files ({shown}); use the relative path as id"
            listing.rejects.append(Reject(image_id, reason, "ambiguous id"))
        else:
            rows.setdefault(matches[0], []).append((line, label))
    for image in images:
        path, entries = image.as_posix(), rows.get(image.as_posix())
        labels = sorted({label for _, label in entries or ()})
        hint, below = _split_of(image.parts)
        if entries is None and hint == "test":
            listing.held_out.append((path, below))
        elif entries is None:
            listing.rejects.append(Reject(path, f"not listed in {csv_name}", "unlabelled"))
        elif len(labels) > 1:
            detail = ", ".join(f"{label!r} (line {line})" for line, label in entries)
            reason = f"conflicting labels in {csv_name}: {detail}"
            listing.rejects.append(Reject(path, reason, "conflicting labels"))
        elif not labels[0]:
            reason = f"empty label in {csv_name} (line {entries[0][0]})"
            listing.rejects.append(Reject(path, reason, "unlabelled"))
        else:
            listing.candidates.append(Candidate(path, labels[0], hint))
            for line, _ in entries[1:]:
                reason = f"repeated id in {csv_name} (line {line}, same label; row ignored)"
                listing.rejects.append(Reject(f"{csv_name}:{line}", reason, "repeated id"))
    return listing
