"""Read and write the tables that pass between stages (manifest, splits, classes), every
column as strings: a class called `NA`, `None` or `1` stays that string."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from visiontune.fileio import read_json, write_csv

# The folder under the prepared dir that the manifest's paths start with.
IMAGES_DIR = "images"
# sha256: of the file's bytes, the id that data.exclude and data.relabel may name it by.
MANIFEST_COLUMNS = ("path", "label", "split_hint", "sha256")
SPLIT_COLUMNS = ("path", "label")
REJECT_COLUMNS = ("path", "reason")
# The reason rejects.csv gives a byte-identical copy, followed by the path of the one kept.
DUPLICATE_OF = "duplicate of "
# edits.csv: each image a person excluded or relabelled (visiontune.data.edits).
EDIT_COLUMNS = ("path", "id", "split_hint", "action", "label", "new_label")
SPLIT_HINTS = ("train", "valid", "test", "")


def read_table(csv_path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """`columns` of a CSV written by a stage, as strings; ValueError names a missing one."""
    frame = pd.read_csv(csv_path, dtype=str, na_filter=False)
    missing = [name for name in columns if name not in frame.columns]
    if missing:
        raise ValueError(
            f"{csv_path}: missing column(s) {', '.join(missing)}; "
            f"found {', '.join(map(str, frame.columns)) or 'none'}"
        )
    return frame.loc[:, list(columns)].reset_index(drop=True)


def read_manifest(csv_path: Path) -> pd.DataFrame:
    """The fetch manifest: `path` (under the prepared dir), `label`, `split_hint`, `sha256`."""
    frame = read_table(Path(csv_path), MANIFEST_COLUMNS)
    bad = sorted(set(frame["split_hint"]) - set(SPLIT_HINTS))
    if bad:
        raise ValueError(f"{csv_path}: unknown split_hint value(s) {bad}; allowed {SPLIT_HINTS}")
    return frame


def read_split(csv_path: Path, image_root: Path) -> pd.DataFrame:
    """`train.csv`/`valid.csv` (`path`, `label`), `path` made absolute under `image_root`."""
    frame = read_table(Path(csv_path), SPLIT_COLUMNS)
    root = Path(image_root).resolve()
    frame["path"] = [str(root / rel) for rel in frame["path"]]
    return frame


def read_classes(path: Path) -> list[str]:
    """The class names of `classes.json`, sorted."""
    classes = read_json(path)
    if not isinstance(classes, list) or not all(isinstance(name, str) for name in classes):
        raise ValueError(f"{path}: expected a JSON list of class names")
    return classes


def label_indices(labels: Sequence[str], classes: Sequence[str], where: str) -> np.ndarray:
    """Each label's index in `classes`; a ValueError names `where` and the unknown labels."""
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted(set(labels) - index.keys())
    if unknown:
        raise ValueError(
            f"{where} has labels not among the {len(classes)} classes: {', '.join(unknown[:10])}"
        )
    return np.array([index[name] for name in labels], dtype=np.int64)


def sorted_rows(frame: pd.DataFrame, columns: tuple[str, ...]) -> pd.DataFrame:
    """`columns` of `frame`, rows sorted by path, so equal inputs give byte-identical files."""
    ordered = frame.reindex(columns=list(columns)).astype(str)
    return ordered.sort_values("path", kind="stable").reset_index(drop=True)


def write_table(path: Path, frame: pd.DataFrame, columns: tuple[str, ...]) -> None:
    """Write `sorted_rows` of `frame` atomically as CSV (UTF-8, `\\n` line ends)."""
    write_csv(path, sorted_rows(frame, columns))


def seeded_rank(seed: int, key: str) -> str:
    """A deterministic pseudo-random sort key for `key` under `seed` (no RNG state)."""
    return hashlib.sha256(f"{seed}\0{key}".encode()).hexdigest()


def valid_edit_counts(edits_csv: Path, valid_paths: Sequence[str]) -> dict[str, int]:
    """How many validation images a person's edits touched: what the accuracy now means.

    `valid_paths` are under the prepared dir. An image excluded from a source without its
    own split had no side yet: `excluded_unsplit`. A folder without `edits.csv` has none.
    """
    if not Path(edits_csv).is_file():
        return {"valid_excluded": 0, "excluded_unsplit": 0, "valid_relabelled": 0}
    edits = read_table(edits_csv, EDIT_COLUMNS)
    in_valid = {path.removeprefix(f"{IMAGES_DIR}/") for path in valid_paths}
    excluded = edits[edits["action"] == "exclude"]
    relabelled = edits[edits["action"] == "relabel"]
    return {
        "valid_excluded": int((excluded["split_hint"] == "valid").sum()),
        "excluded_unsplit": int((excluded["split_hint"] == "").sum()),
        "valid_relabelled": int(relabelled["path"].isin(in_valid).sum()),
    }
