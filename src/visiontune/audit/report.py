"""The audit's files: findings.csv, metrics.json, audit.md and its pictures."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from visiontune.audit import MIN_PROBE_ROWS
from visiontune.data.images import UnreadableImageError, open_rgb
from visiontune.evaluate.plots import markdown_table, short_name
from visiontune.fileio import atomic_path, write_csv, write_json, write_text

THUMBNAIL = 200
FONT = 13
PICTURES = {"label": "suspect_labels.png", "duplicate": "duplicates.png", "outlier": "outliers.png"}
TITLES = {
    "label": "Suspect labels: the given label, and the class the out-of-sample probe favours",
    "duplicate": "Near-duplicate pairs, side by side",
    "outlier": "Outliers: far from every other image",
}
CAPTIONS = {  # str.format of a finding's columns, a line each
    "label": ["given: {given_label}", "suggested: {suggested_label}", "{split}, score {score:.2f}"],
    "duplicate": ["{split}: {given_label}", "score {score:.2f}"],
    "outlier": ["{split}: {given_label}", "z = {score:.1f}"],
}
HEADINGS = {"label": "Suspect labels", "duplicate": "Near-duplicates", "outlier": "Outliers"}
# audit.md's columns of each kind after path, split and given_label
COLUMNS = {
    "label": ["suggested_label", "score"],
    "duplicate": ["other_path", "other_split", "other_label", "score"],
    "outlier": ["score"],
}
# Below this held-out accuracy of the probe, most disagreements are the probe's errors,
# not the labels' (dogbreeds: 64 %, 33 planted flips among 294 flags).
WEAK_PROBE = 0.85


def headline(metrics: Mapping[str, Any]) -> str:
    """The stage's line: what to look at first."""
    line = (
        f"{metrics['label_issues']} suspect labels ({metrics['label_issues_valid']} in valid), "
        f"{metrics['duplicate_pairs']} duplicate pairs "
        f"({metrics['duplicate_pairs_across_splits']} across train/valid), "
        f"{metrics['outliers']} outliers"
    )
    if metrics["identical_files_dropped"]:
        line += f", and {metrics['identical_files_dropped']} identical files fetch dropped"
    if metrics["probe_cv_accuracy"] is None:
        line += f"; too few train images to audit labels (fewer than {MIN_PROBE_ROWS})"
    elif metrics["probe_cv_accuracy"] < WEAK_PROBE:
        line += (
            f"; the linear probe is right on only {metrics['probe_cv_accuracy']:.0%} of held-out "
            "train images, so many suspect labels are hard images: read them from the top"
        )
    return line


def write_audit(
    out_dir: Path, findings: pd.DataFrame, metrics: Mapping[str, Any], image_root: Path, show: int
) -> None:
    """Write every audit file into `out_dir` (atomically each)."""
    write_csv(out_dir / "findings.csv", findings)
    write_json(out_dir / "metrics.json", dict(metrics))
    for kind, name in PICTURES.items():
        tiles = []
        for row in findings[findings["kind"] == kind].head(show).itertuples(index=False):
            caption = [line.format(**row._asdict()) for line in CAPTIONS[kind]]
            tiles.append((image_root / row.path, caption))
            if kind == "duplicate":
                other = [f"{row.other_split}: {row.other_label}", "its near-duplicate"]
                tiles.append((image_root / row.other_path, other))
        with atomic_path(out_dir / name) as tmp:
            contact_sheet(tiles, TITLES[kind]).save(tmp, format="PNG")
    write_text(out_dir / "audit.md", render_markdown(findings, metrics, show))


def contact_sheet(tiles: list[tuple[Path, list[str]]], title: str, cols: int = 4) -> Image.Image:
    """Thumbnails in rows of `cols`, each with its caption lines below: drawn with Pillow,
    ten times faster than a matplotlib figure of as many images."""
    font = ImageFont.load_default(size=FONT)
    line = FONT + 4
    caption = max((len(lines) for _, lines in tiles), default=0) * line
    rows = max(-(-len(tiles) // cols), 1)
    cell_w, cell_h = THUMBNAIL + 8, THUMBNAIL + caption + 12
    sheet = Image.new("RGB", (cols * cell_w, 2 * line + rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((8, 6), title if tiles else f"{title}: none found", fill="black", font=font)
    for n, (path, lines) in enumerate(tiles):
        x, y = (n % cols) * cell_w + 4, 2 * line + (n // cols) * cell_h
        try:
            image = open_rgb(path)
            image.thumbnail((THUMBNAIL, THUMBNAIL))
        except (UnreadableImageError, OSError):  # moved since fetch: a grey tile keeps the grid
            image = Image.new("RGB", (THUMBNAIL, THUMBNAIL), (200, 200, 200))
        sheet.paste(image, (x + (THUMBNAIL - image.width) // 2, y + THUMBNAIL - image.height))
        for i, text in enumerate(lines):
            where = (x, y + THUMBNAIL + 4 + i * line)
            draw.text(where, short_name(text, 34), fill="black", font=font)
    return sheet


def render_markdown(findings: pd.DataFrame, metrics: Mapping[str, Any], show: int) -> str:
    """audit.md: the counts, the top findings of each kind, and how to act on them."""
    lines = [
        "# Data audit",
        "",
        f"{metrics['images']} images. {headline(metrics)}.",
        "",
        f"cleanlab estimates {metrics['label_issues_estimated']} wrong labels. The findings are "
        "in `findings.csv`, each kind most suspect first. Nothing here changes the data: "
        "see docs/data.md for `data.exclude` and `data.relabel`.",
        "",
    ]
    for kind, name in PICTURES.items():
        rows = findings[findings["kind"] == kind]
        lines += [f"## {HEADINGS[kind]} ({len(rows)})", ""]
        if len(rows):
            table = rows.head(show)[["path", "split", "given_label", *COLUMNS[kind]]]
            lines += [f"![{HEADINGS[kind]}]({name})", "", markdown_table(table), ""]
        else:
            lines += ["None found.", ""]
    return "\n".join(lines)
