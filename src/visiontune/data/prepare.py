"""Build the prepared dataset: check every image, drop duplicates, subset, copy, write tables.

Output (under `out_dir`): `images/<layout of the source>`, `manifest.csv`
(path,label,split_hint), `classes.json`, `rejects.csv` (path,reason), and `test/`: the
source's unlabelled test images, held out as they are (not decoded here: every one of them
needs a prediction; `visiontune predict --submission` reports the unreadable ones).
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from visiontune.config import DataParams
from visiontune.data.images import inspect_image
from visiontune.data.manifest import (
    MANIFEST_COLUMNS,
    REJECT_COLUMNS,
    seeded_rank,
    sorted_rows,
    write_classes,
    write_table,
)
from visiontune.data.sources import (
    Candidate,
    Listing,
    Reject,
    SourceError,
    list_folders,
    list_labelled,
    resolve_labels_path,
    resolve_source,
)
from visiontune.fileio import sha256_file
from visiontune.locations import Locator

IMAGES_DIR = "images"
TEST_DIR = "test"
_LAYOUTS = {"folders": "a folder per class", "labels_csv": "images + a labels CSV"}


def prepare_dataset(
    params: DataParams,
    out_dir: Path,
    download_dir: Path,
    locate: Locator,
    *,
    seed: int,
    workers: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Fetch `params.source` and write the prepared dataset into `out_dir`.

    Args:
        params: the `data` section.
        out_dir: an empty folder (the stage swaps it into place when done).
        download_dir: cache for downloads and scratch space for extraction.
        locate: finds the relative paths of `params` (source, mirrors, labels).
        seed: picks the `max_per_class` subset.
        workers: threads decoding images (Pillow releases the GIL while decoding).

    Returns:
        A JSON-able summary: the source used, counts, rejects by kind, empty classes.
    """
    out_dir = Path(out_dir)
    with resolve_source(
        params.source,
        params.mirrors,
        download_dir,
        locate,
        sha256=params.sha256,
        retries=params.download_retries,
        timeout_s=params.download_timeout_s,
    ) as source:
        if params.labels:
            labels_csv = resolve_labels_path(params.labels, source.root, locate)
            listing = list_labelled(source.root, labels_csv, params.id_column, params.label_column)
        else:
            listing = list_folders(source.root)
        rejects = list(listing.rejects)
        hashed, unreadable = hash_files(source.root, listing.candidates, workers)
        unique, duplicates = drop_duplicates(hashed)
        kept, broken, skipped = select_images(
            source.root,
            unique,
            max_per_class=params.max_per_class,
            seed=seed,
            max_pixels=params.max_image_pixels,
            workers=workers,
            progress=progress,
        )
        rejects += unreadable + duplicates + broken
        if not kept:
            raise SourceError(_nothing_usable(source.used, source.root, listing, rejects))
        for candidate in kept:
            target = out_dir / IMAGES_DIR / candidate.path
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.root / candidate.path, target)
        held_out = 0
        for path, below in listing.held_out:
            target = out_dir / TEST_DIR / below
            if target.exists():  # two test folders with the same file name
                reason = f"test image name taken: {TEST_DIR}/{below}"
                rejects.append(Reject(path, reason, "duplicate"))
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source.root / path, target)
            held_out += 1

    manifest = pd.DataFrame(
        [(f"{IMAGES_DIR}/{c.path}", c.label, c.split_hint) for c in kept],
        columns=list(MANIFEST_COLUMNS),
    )
    reject_frame = pd.DataFrame([(r.path, r.reason) for r in rejects], columns=["path", "reason"])
    write_table(out_dir / "manifest.csv", sorted_rows(manifest, MANIFEST_COLUMNS), MANIFEST_COLUMNS)
    write_table(out_dir / "rejects.csv", sorted_rows(reject_frame, REJECT_COLUMNS), REJECT_COLUMNS)
    classes = sorted(set(manifest["label"]))
    write_classes(out_dir / "classes.json", classes)
    return {
        "source": {
            "requested": source.requested,
            "used": source.used,
            "kind": source.kind,
            "layout": listing.layout,
            "archive_sha256": source.archive_sha256,
            "reason": source.reason,
        },
        "images": len(kept),
        "candidates": len(listing.candidates),
        "rejected": len(rejects),
        "rejected_by_kind": dict(sorted(Counter(r.kind for r in rejects).items())),
        "skipped_by_max_per_class": skipped,
        "classes": len(classes),
        "per_class": dict(sorted(Counter(manifest["label"]).items())),
        "split_hints": dict(sorted(Counter(manifest["split_hint"]).items())),
        "empty_classes": sorted(listing.class_folders - set(classes)),
        "held_out_test": held_out,
    }


def _nothing_usable(used: str, root: Path, listing: Listing, rejects: Sequence[Reject]) -> str:
    """Why a source gave no image to train on: what was looked for, and what was there."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    kinds = Counter(r.kind for r in rejects)
    found = f"its top level holds {shown or 'nothing'}"
    if kinds:
        found += "; rejected: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    if listing.layout == "labels_csv":
        wanted = "image files named by the ids of data.labels"
    else:
        wanted = (
            "a folder per class (<class>/<image>, optionally below train/ and valid/), or "
            "a folder of images plus a labels CSV (set data.labels)"
        )
    return f"no usable images in {used} ({root}): looked for {wanted}; {found}"


def hash_files(
    root: Path, candidates: Sequence[Candidate], workers: int = 1
) -> tuple[list[tuple[Candidate, str]], list[Reject]]:
    """SHA-256 of every candidate file: ([(candidate, digest)], rejects for unreadable files)."""

    def digest(candidate: Candidate) -> str | Reject:
        try:
            return sha256_file(root / candidate.path)
        except OSError as exc:
            reason = f"cannot read file: {exc.strerror or exc}"
            return Reject(candidate.path, reason, "unreadable")

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        results = list(pool.map(digest, candidates))
    hashed = [(c, r) for c, r in zip(candidates, results, strict=True) if isinstance(r, str)]
    return hashed, [r for r in results if isinstance(r, Reject)]


def drop_duplicates(
    images: Sequence[tuple[Candidate, str]],
) -> tuple[list[Candidate], list[Reject]]:
    """Keep one file of each set of byte-identical files; reject the others.

    When identical files carry different labels, nobody knows which label is right,
    so all copies are rejected.
    """
    groups: dict[str, list[Candidate]] = {}
    for candidate, digest in images:
        groups.setdefault(digest, []).append(candidate)
    kept: list[Candidate] = []
    rejects: list[Reject] = []
    for group in groups.values():
        group = sorted(group, key=lambda c: c.path)
        labels = sorted({c.label for c in group})
        if len(labels) > 1:
            others = ", ".join(f"{c.path} ({c.label})" for c in group[:5])
            for candidate in group:
                reason = f"identical files with conflicting labels: {others}"
                rejects.append(Reject(candidate.path, reason, "conflicting duplicate"))
            continue
        kept.append(group[0])
        for candidate in group[1:]:
            rejects.append(Reject(candidate.path, f"duplicate of {group[0].path}", "duplicate"))
    return kept, rejects


def select_images(
    root: Path,
    images: Sequence[Candidate],
    *,
    max_per_class: int | None,
    seed: int,
    max_pixels: int | None,
    workers: int = 1,
    progress: bool = True,
) -> tuple[list[Candidate], list[Reject], int]:
    """Decode images and keep the readable ones, at most `max_per_class` per (label, hint).

    With `max_per_class`, each group is ranked by a seeded hash of the path and decoded
    in that order only until it has enough readable images, so a quick run on a big
    folder stays quick. Ranking by hash instead of shuffling keeps each file's fate
    independent of the others: adding images does not reshuffle the existing choice.

    Returns:
        (kept images sorted by path, rejects for unreadable ones, number left unchecked).
    """
    groups: dict[tuple[str, str], list[Candidate]] = {}
    for candidate in sorted(images, key=lambda c: c.path):
        groups.setdefault((candidate.label, candidate.split_hint), []).append(candidate)
    if max_per_class is not None:
        for group in groups.values():
            group.sort(key=lambda c: seeded_rank(seed, c.path))
    limit = max_per_class if max_per_class is not None else len(images)
    need = dict.fromkeys(groups, limit)
    kept: list[Candidate] = []
    rejects: list[Reject] = []
    total = len(images) if max_per_class is None else None
    bar = tqdm(total=total, desc="check images", unit="img", disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while batch := [c for key, group in groups.items() for c in group[: need[key]]]:
            for key in groups:
                del groups[key][: need[key]]
            check = partial(inspect_image, max_pixels=max_pixels)
            reasons = pool.map(check, [root / c.path for c in batch])
            for candidate, reason in zip(batch, reasons, strict=True):
                bar.update()
                if reason is None:
                    kept.append(candidate)
                    need[(candidate.label, candidate.split_hint)] -= 1
                else:
                    rejects.append(Reject(candidate.path, reason, "unreadable"))
    skipped = sum(len(group) for group in groups.values())
    return sorted(kept, key=lambda c: c.path), rejects, skipped


def format_summary(summary: dict[str, Any], rejects_path: Path) -> str:
    """A few human lines for the end of the fetch stage."""
    hints = ", ".join(f"{k or 'no hint'} {v}" for k, v in summary["split_hints"].items())
    source = summary["source"]
    layout = _LAYOUTS.get(source["layout"], source["layout"])
    lines = [
        f"fetch: source {source['used']} ({layout}): {source['reason']}",
        f"fetch: {summary['images']} images in {summary['classes']} classes ({hints or 'none'})",
    ]
    if summary["rejected"]:
        kinds = ", ".join(f"{n} {kind}" for kind, n in summary["rejected_by_kind"].items())
        lines.append(f"fetch: {summary['rejected']} files rejected ({kinds}); see {rejects_path}")
    else:
        lines.append("fetch: no files rejected")
    if summary["skipped_by_max_per_class"]:
        lines.append(f"fetch: {summary['skipped_by_max_per_class']} left out by max_per_class")
    if summary.get("held_out_test"):
        lines.append(
            f"fetch: {summary['held_out_test']} unlabelled test images held out in "
            f"{rejects_path.parent / TEST_DIR} (the predict_test stage predicts them)"
        )
    if summary["empty_classes"]:
        lines.append(f"fetch: class folders without usable images: {summary['empty_classes']}")
    return "\n".join(lines)
