"""A person's corrections to the source, applied by fetch: `data.exclude` and `data.relabel`.

An entry names an image by its id, the SHA-256 of its bytes (findings.csv's `id`), which
survives renaming and moving the file, or by its path under the source, easier to write by
hand. A relabel wins over the folder name or `data.labels`: it is applied last.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import pandas as pd

from visiontune.data.manifest import EDIT_COLUMNS
from visiontune.data.sources import Candidate, SourceError
from visiontune.locations import Locator

_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class Edits:
    exclude: frozenset[str] = frozenset()  # ids and paths
    relabel: dict[str, str] = field(default_factory=dict)  # id or path -> the right label


@dataclass(frozen=True)
class Applied:
    kept: list[Candidate]  # relabelled where asked
    edits: pd.DataFrame  # EDIT_COLUMNS: one row per image excluded or relabelled
    unmatched: list[str]  # entries that named no kept image


def read_edits(exclude: str | Sequence[str] | None, relabel: str | None, locate: Locator) -> Edits:
    """The entries of `data.exclude` (a CSV file, or a list of ids and paths) and
    `data.relabel` (a CSV file with a label column)."""
    if isinstance(exclude, str):
        excluded = _keys(_read(exclude, "data.exclude", locate), "data.exclude")
    else:
        excluded = [entry.strip() for entry in exclude or ()]
    relabelled: dict[str, str] = {}
    if relabel is not None:
        table = _read(relabel, "data.relabel", locate)
        if "label" not in table.columns:
            raise SourceError(
                f"data.relabel {relabel}: needs a label column (the right class); "
                f"it has {', '.join(table.columns)}"
            )
        labels = table["label"].str.strip()
        if (labels == "").any():
            line = int((labels == "").to_numpy().argmax()) + 2  # the header is line 1
            raise SourceError(f"data.relabel {relabel}: empty label on line {line}")
        relabelled = dict(zip(map(_normal, _keys(table, "data.relabel")), labels, strict=True))
    return Edits(frozenset(_normal(e) for e in excluded if e), relabelled)


def _read(written: str, what: str, locate: Locator) -> pd.DataFrame:
    path = locate.locate(written, f"{what} file").path
    try:
        return pd.read_csv(path, dtype=str, na_filter=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SourceError(f"{what} {path}: not a readable CSV ({exc})") from None


def _keys(table: pd.DataFrame, what: str) -> list[str]:
    """Each row's id where the table has that column (findings.csv has both), else its path."""
    for column in ("id", "path"):
        if column in table.columns:
            return [key.strip() for key in table[column]]
    raise SourceError(
        f"{what}: needs an id column (SHA-256, as findings.csv has) or a path column "
        f"(under the source); it has {', '.join(table.columns)}"
    )


def _normal(key: str) -> str:
    """An id in lower case; a path with / separators and no leading ./"""
    key = key.strip()
    return (
        key.lower() if _SHA256.fullmatch(key.lower()) else key.replace("\\", "/").removeprefix("./")
    )


def apply_edits(kept: Sequence[Candidate], ids: dict[str, str], edits: Edits) -> Applied:
    """`kept` less the excluded images, with the relabelled ones' new labels."""
    used: set[str] = set()
    result, rows = [], []
    for candidate in kept:
        names = (ids[candidate.path], candidate.path)
        row = (candidate.path, ids[candidate.path], candidate.split_hint)
        if excluded := edits.exclude.intersection(names):
            used |= excluded
            rows.append((*row, "exclude", candidate.label, ""))
            continue
        entry = next((name for name in names if name in edits.relabel), None)
        if entry is not None:
            used.add(entry)
            if edits.relabel[entry] != candidate.label:
                rows.append((*row, "relabel", candidate.label, edits.relabel[entry]))
                candidate = replace(candidate, label=edits.relabel[entry])
        result.append(candidate)
    unmatched = sorted((edits.exclude | edits.relabel.keys()) - used)
    table = pd.DataFrame(rows, columns=list(EDIT_COLUMNS))
    return Applied(result, table, unmatched)


def edit_counts(edits: pd.DataFrame) -> dict[str, dict[str, int]]:
    """{action: {split_hint or 'no hint': n}} for the summary."""
    counts: dict[str, dict[str, int]] = {}
    for (action, hint), n in edits.groupby(["action", "split_hint"]).size().items():
        counts.setdefault(str(action), {})[str(hint) or "no hint"] = int(n)
    return counts
