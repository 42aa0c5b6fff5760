"""A cheap fingerprint of the local files `fetch` reads, so DVC re-runs it when they change.

The source may be a URL or a folder outside the repo, so it cannot be a DVC dependency: the
`always_changed` stage `source_stamp` writes this fingerprint, and `fetch` depends on that file.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from visiontune.config import DataParams
from visiontune.data.download import is_url
from visiontune.data.sources import pick_mirror
from visiontune.locations import Located, Locator


def _files(root: Path) -> Iterator[tuple[str, os.stat_result]]:
    """(path relative to `root`, stat) of every file below `root`, in no fixed order.

    scandir types the entries without a syscall, so only files are stat'ed; symlinked
    folders are not followed (nor are they by `os.walk`, which lists the source)."""
    todo = [""]
    while todo:
        rel = todo.pop()
        with os.scandir(root / rel) as entries:
            for entry in entries:
                name = f"{rel}/{entry.name}" if rel else entry.name
                if entry.is_dir(follow_symlinks=False):
                    todo.append(name)
                elif entry.is_file():
                    yield name, entry.stat()


def stamp_path(located: Located | None, written: str) -> dict[str, Any]:
    """File count, bytes, and a digest of every file's (relative path, size, mtime in ns).

    `path` as `params.yaml` writes it: the workspace and DVC's experiment copies stamp the
    same files alike. As make's quick check, an edit keeping size and mtime goes unseen.
    """
    if located is None:
        return {"path": written, "kind": "missing"}  # fetch itself says what is wrong
    root = located.path
    listing = [("", root.stat())] if root.is_file() else sorted(_files(root), key=lambda f: f[0])
    digest = hashlib.sha256()
    for rel, stat in listing:
        digest.update(f"{rel}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return {
        "path": written,
        "kind": "file" if root.is_file() else "directory",
        "files": len(listing),
        "bytes": sum(stat.st_size for _, stat in listing),
        "digest": digest.hexdigest(),
    }


def source_stamp(params: DataParams, locate: Locator) -> dict[str, Any]:
    """What `fetch` will read, found as fetch finds it: the local source (or the URL's local
    mirror), a local labels CSV and the data.exclude/relabel files. A URL without a mirror
    stands for itself: `data.sha256`, a param DVC already compares, pins its content.
    """
    stamp: dict[str, Any] = {"source": params.source}
    url = is_url(params.source)
    source = (
        pick_mirror(params.source, params.mirrors, locate) if url else locate.find(params.source)
    )
    if source is None and url:
        stamp["used"] = {"path": params.source, "kind": "url"}
    else:
        stamp["used"] = stamp_path(source, source.written if source else params.source)
    if params.labels is not None and not is_url(params.labels):
        labels = locate.find(params.labels)
        # Looked up as fetch does: inside a source folder first.
        if source is not None and (source.path / params.labels).is_file():
            labels = Located(params.labels, source.path / params.labels, "in the source")
        stamp["labels"] = stamp_path(labels, params.labels)
    for what, written in (("exclude", params.exclude), ("relabel", params.relabel)):
        if isinstance(written, str):  # a file, not a list of ids and paths
            stamp[what] = stamp_path(locate.find(written), written)
    return stamp
