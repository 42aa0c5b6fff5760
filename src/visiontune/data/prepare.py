"""Build the prepared dataset: check every image, drop duplicates, subset, copy, write tables.

Under `out_dir`: `images/<layout of the source>`, `manifest.csv`, `rejects.csv`, `edits.csv`,
and `test/`, the source's unlabelled test images as they are (not decoded: each needs a
prediction, and `visiontune predict --submission` reports the unreadable ones).
"""

from __future__ import annotations

import hashlib
import shutil
from collections import Counter, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd
from tqdm import tqdm

from visiontune.config import DataParams
from visiontune.data.edits import EDIT_COLUMNS, apply_edits, edit_counts, read_edits
from visiontune.data.images import inspect_image
from visiontune.data.manifest import (
    DUPLICATE_OF,
    IMAGES_DIR,
    MANIFEST_COLUMNS,
    REJECT_COLUMNS,
    seeded_rank,
    write_table,
)
from visiontune.data.sources import (
    Candidate,
    Reject,
    SourceError,
    list_folders,
    list_labelled,
    resolve_labels_path,
    resolve_source,
)
from visiontune.fileio import sha256_file
from visiontune.locations import Locator

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

    `out_dir` is an empty folder, `download_dir` the download cache and extraction scratch
    space, `seed` picks the `max_per_class` subset, and `workers` threads decode images
    (Pillow releases the GIL while decoding). Returns a JSON-able summary.
    """
    # Read before the source: a missing or malformed edit file stops fetch at once.
    edits = read_edits(params.exclude, params.relabel, locate)
    with resolve_source(params, download_dir, locate) as source:
        if params.labels:
            labels_csv = resolve_labels_path(params.labels, source.root, locate)
            listing = list_labelled(source.root, labels_csv, params.id_column, params.label_column)
        else:
            listing = list_folders(source.root)
        ingested = ingest_images(
            source.root,
            listing.candidates,
            out_dir / IMAGES_DIR,
            max_per_class=params.max_per_class,
            seed=seed,
            max_pixels=params.max_image_pixels,
            workers=workers,
            progress=progress,
        )
        applied = apply_edits(ingested.kept, ingested.ids, edits)
        kept = applied.kept
        rejects = [*listing.rejects, *ingested.rejects]
        for row in applied.edits[applied.edits["action"] == "exclude"].itertuples(index=False):
            (out_dir / IMAGES_DIR / row.path).unlink()
            rejects.append(Reject(row.path, f"excluded by data.exclude (id {row.id})", "excluded"))
        if not kept:
            raise SourceError(_nothing_usable(source.used, source.root, listing.layout, rejects))
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
        [(f"{IMAGES_DIR}/{c.path}", c.label, c.split_hint, ingested.ids[c.path]) for c in kept],
        columns=list(MANIFEST_COLUMNS),
    )
    reject_frame = pd.DataFrame([(r.path, r.reason) for r in rejects], columns=list(REJECT_COLUMNS))
    write_table(out_dir / "manifest.csv", manifest, MANIFEST_COLUMNS)
    write_table(out_dir / "rejects.csv", reject_frame, REJECT_COLUMNS)
    # What a person changed: evaluate says how many valid images it touched.
    write_table(out_dir / "edits.csv", applied.edits, EDIT_COLUMNS)
    # The class list is split's (`classes.json`): min_per_class may drop a class there.
    classes = sorted(set(manifest["label"]))
    return {
        "source": {
            "requested": params.source,
            "used": source.used,
            "kind": source.kind,
            "layout": listing.layout,
            "archive_sha256": source.archive_sha256,
            "reason": source.reason,
        },
        "images": len(manifest),
        "candidates": len(listing.candidates),
        "rejected": len(rejects),
        "rejected_by_kind": dict(sorted(Counter(r.kind for r in rejects).items())),
        "skipped_by_max_per_class": ingested.skipped,
        "classes": len(classes),
        "per_class": dict(sorted(Counter(manifest["label"]).items())),
        "split_hints": dict(sorted(Counter(manifest["split_hint"]).items())),
        "empty_classes": sorted(listing.class_folders - set(classes)),
        "held_out_test": held_out,
        "edits": edit_counts(applied.edits),
        "edits_unmatched": applied.unmatched,
    }


def _nothing_usable(used: str, root: Path, layout: str, rejects: Sequence[Reject]) -> str:
    """Why a source gave no image to train on: what was looked for, and what was there."""
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in root.iterdir())
    shown = ", ".join(entries[:8]) + (f" and {len(entries) - 8} more" if len(entries) > 8 else "")
    kinds = Counter(r.kind for r in rejects)
    found = f"its top level holds {shown or 'nothing'}"
    if kinds:
        found += "; rejected: " + ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
    if layout == "labels_csv":
        wanted = "image files named by the ids of data.labels"
    else:
        wanted = (
            "a folder per class (<class>/<image>, optionally below train/ and valid/), or "
            "a folder of images plus a labels CSV (set data.labels)"
        )
    return f"no usable images in {used} ({root}): looked for {wanted}; {found}"


@dataclass(frozen=True)
class Ingested:
    kept: list[Candidate]  # written into the images folder
    ids: dict[str, str]  # path -> SHA-256 of each kept file
    rejects: list[Reject]
    skipped: int  # distinct files left unchecked by max_per_class


def ingest_images(
    root: Path,
    candidates: Sequence[Candidate],
    images_dir: Path,
    *,
    max_per_class: int | None,
    seed: int,
    max_pixels: int | None,
    workers: int = 1,
    progress: bool = True,
) -> Ingested:
    """Keep the readable, distinct images, at most `max_per_class` per (label, split hint),
    reading each file once: the same bytes are hashed, checked and written to `images_dir`.

    With `max_per_class`, a group is taken in the seeded hash order of its paths (adding
    images reshuffles nothing) until it has enough readable images; the files beyond are
    hashed for duplicates, never decoded, so a quick run on a big folder stays quick. Of
    byte-identical files the first taken is kept, and none where their labels differ
    (nobody knows which is right); a group that loses an image so, or to an unreadable
    file, is topped up from its next-ranked files.
    """
    ordered = sorted(candidates, key=lambda c: c.path)
    by_group: dict[tuple[str, str], list[Candidate]] = {}
    for candidate in ordered:
        by_group.setdefault((candidate.label, candidate.split_hint), []).append(candidate)
    if max_per_class is not None:
        for group in by_group.values():
            group.sort(key=lambda c: seeded_rank(seed, c.path))
    groups = {key: deque(group) for key, group in by_group.items()}
    need = dict.fromkeys(groups, max_per_class if max_per_class is not None else len(candidates))
    digests: dict[str, str] = {}  # path -> SHA-256 of its bytes
    rejects: dict[str, Reject] = {}  # path -> why
    kept: dict[str, Candidate] = {}  # digest -> the copy written
    banned: set[str] = set()  # digests of identical files with conflicting labels

    def read(candidate: Candidate, decode: bool = True) -> tuple[str, str | None] | Reject:
        """Read once: the digest and, decoding, why the image is unusable (None: written)."""
        try:
            if not decode:  # a file beyond what is needed: hashed for the duplicates only
                return sha256_file(root / candidate.path), None
            data = (root / candidate.path).read_bytes()
        except OSError as exc:
            return Reject(candidate.path, f"cannot read file: {exc.strerror or exc}", "unreadable")
        reason = inspect_image(data, max_pixels, name=candidate.path)
        if reason is None:  # a duplicate is deleted again once known (rare)
            target = images_dir / candidate.path
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        return hashlib.sha256(data).hexdigest(), reason

    def copies() -> dict[str, list[Candidate]]:
        """The files read and not rejected, by digest, in path order."""
        found: dict[str, list[Candidate]] = {}
        for c in ordered:
            if c.path in digests and c.path not in rejects:
                found.setdefault(digests[c.path], []).append(c)
        return found

    def next_batch() -> list[Candidate]:
        """The next `need` files of each group, known duplicates passed over."""
        batch = []
        for key, group in groups.items():
            taken = 0
            while taken < need[key] and group:
                candidate = group.popleft()
                if digests.get(candidate.path) in kept or digests.get(candidate.path) in banned:
                    continue  # a known duplicate: no need to read it again
                batch.append(candidate)
                taken += 1
        return batch

    bar = tqdm(total=len(candidates), desc="check images", unit="img", disable=not progress)
    with bar, ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        while True:
            while batch := next_batch():
                # Results in batch order, whatever the threads' timing: deterministic.
                for candidate, result in zip(batch, pool.map(read, batch), strict=True):
                    bar.update(candidate.path not in digests)
                    if isinstance(result, Reject):
                        rejects[candidate.path] = result
                        continue
                    digest, reason = result
                    digests[candidate.path] = digest
                    if reason is not None:
                        rejects[candidate.path] = Reject(candidate.path, reason, "unreadable")
                    elif digest not in kept and digest not in banned:
                        kept[digest] = candidate
                        need[(candidate.label, candidate.split_hint)] -= 1
                    else:
                        (images_dir / candidate.path).unlink()
            rest = [c for group in groups.values() for c in group if c.path not in digests]
            hashed = pool.map(partial(read, decode=False), rest)
            for candidate, result in zip(rest, hashed, strict=True):
                bar.update()
                if isinstance(result, Reject):
                    rejects[candidate.path] = result
                else:
                    digests[candidate.path] = result[0]
            conflicts = {d for d, same in copies().items() if len({c.label for c in same}) > 1}
            conflicts -= banned
            banned |= conflicts
            if not conflicts & kept.keys():
                break
            for digest in conflicts & kept.keys():  # take them out; top the groups up
                loser = kept.pop(digest)
                (images_dir / loser.path).unlink()
                need[(loser.label, loser.split_hint)] += 1
                groups[(loser.label, loser.split_hint)].appendleft(loser)  # passed over: banned

    # Every file is now kept, rejected or skipped; a duplicate names the copy kept.
    skipped = 0
    for digest, same in copies().items():
        if digest in banned:
            others = ", ".join(f"{c.path} ({c.label})" for c in same[:5])
            reason = f"identical files with conflicting labels: {others}"
            rejects.update({c.path: Reject(c.path, reason, "conflicting duplicate") for c in same})
            continue
        first = kept.get(digest, same[0])
        for c in same:
            if c.path != first.path:
                rejects[c.path] = Reject(c.path, f"{DUPLICATE_OF}{first.path}", "duplicate")
        skipped += digest not in kept
    ids = {c.path: digest for digest, c in kept.items()}
    return Ingested(sorted(kept.values(), key=lambda c: c.path), ids, [*rejects.values()], skipped)


def format_summary(summary: dict[str, Any], rejects_path: Path) -> str:
    """A few human lines for the end of the fetch stage."""
    source, unmatched = summary["source"], summary["edits_unmatched"]
    hints = ", ".join(f"{k or 'no hint'} {v}" for k, v in summary["split_hints"].items())
    kinds = ", ".join(f"{n} {kind}" for kind, n in summary["rejected_by_kind"].items())
    lines = [
        f"source {source['used']} ({_LAYOUTS[source['layout']]}): {source['reason']}",
        f"{summary['images']} images in {summary['classes']} classes ({hints or 'none'})",
        f"{summary['rejected']} files rejected ({kinds}); see {rejects_path}"
        if summary["rejected"]
        else "no files rejected",
    ]
    if summary["skipped_by_max_per_class"]:
        lines.append(f"{summary['skipped_by_max_per_class']} left out by max_per_class")
    if summary.get("held_out_test"):
        lines.append(
            f"{summary['held_out_test']} unlabelled test images held out in "
            f"{rejects_path.parent / TEST_DIR} (the predict_test stage predicts them)"
        )
    if summary["empty_classes"]:
        lines.append(f"class folders without usable images: {summary['empty_classes']}")
    for action, counts in summary["edits"].items():
        where = ", ".join(f"{n} {hint}" for hint, n in counts.items())
        verb = "excluded by data.exclude" if action == "exclude" else "relabelled by data.relabel"
        lines.append(f"{sum(counts.values())} images {verb} ({where})")
    if unmatched:
        lines.append(
            f"warning: {len(unmatched)} entries of data.exclude/relabel name no image of the "
            f"source (e.g. {', '.join(unmatched[:5])})"
        )
    return "\n".join(f"fetch: {line}" for line in lines)
