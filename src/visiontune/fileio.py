"""Atomic file and directory writes, so a killed stage never leaves a half-written output."""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pandas as pd
from pydantic import BaseModel


def sha256_file(path: str | Path) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks (memory stays flat on any size)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _remove_orphans(path: Path) -> None:
    """Delete temp files/folders an earlier write of `path` left when it was SIGKILLed.

    Nothing else cleans them: DVC removes a stage's outputs, not their hidden siblings, and
    never touches a folder that is no output (the checkpoints), so each kill would leak a
    full-size copy.
    """
    for orphan in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        if orphan.is_dir() and not orphan.is_symlink():
            shutil.rmtree(orphan, ignore_errors=True)
        else:
            orphan.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temp path beside `path`; rename it over `path` only if the block succeeds.

    The temp file lives in the same directory so the final `os.replace` is atomic, and
    the previous content of `path` survives any failure (including a full disk).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", **kwargs: Any) -> Iterator[IO[Any]]:
    """Open a temp file for writing that replaces `path` when closed without error."""
    if "w" not in mode:
        raise ValueError(f"atomic_open is for writing, got mode {mode!r}")
    if "b" not in mode:
        kwargs.setdefault("encoding", "utf-8")
        kwargs.setdefault("newline", "")
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as handle:
        yield handle


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Build a directory under a temp name and swap it into place when done."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_orphans(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        old = path.with_name(f".{path.name}.old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _jsonable(value: Any) -> Any:
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item"):  # numpy and torch scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} as JSON")


def write_json(path: str | Path, data: Any) -> None:
    """Write pretty, key-sorted JSON atomically (stable bytes for DVC)."""
    with atomic_open(path) as handle:
        json.dump(data, handle, indent=2, sort_keys=True, default=_jsonable)
        handle.write("\n")


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def write_csv(path: str | Path, frame: pd.DataFrame) -> None:
    """Write a DataFrame as CSV atomically, without the index."""
    with atomic_open(path) as handle:
        frame.to_csv(handle, index=False, lineterminator="\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as handle:
        handle.write(text)


def write_safetensors(
    path: str | Path, tensors: dict[str, Any], metadata: dict[str, str] | None = None
) -> None:
    """Write tensors as safetensors atomically, with a canonical (key-sorted) header.

    safetensors serialises `metadata` from a Rust HashMap, whose order changes from call to
    call: with two or more metadata keys the same tensors gave different bytes (and DVC
    hashes). Offsets in the header are explicit, so sorting its keys keeps the file valid.
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    encoded = canonical.encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format pads the header to 8 bytes
    with atomic_open(path, "wb") as handle:
        handle.write(len(encoded).to_bytes(8, "little"))
        handle.write(encoded)
        handle.write(data[8 + size :])


def save_config(path: str | Path, config: BaseModel | dict[str, Any]) -> None:
    """Record the resolved config a stage ran with, beside its outputs."""
    write_json(path, config)
