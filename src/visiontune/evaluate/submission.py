"""A submission table: `id`, then each class's probability, or the positive class's alone.
Torch-free, so predict_test writes the header in a blink where there are no test images."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from typing import Any, TextIO


def submission_writer(
    out: TextIO, classes: Sequence[str], positive: str | None = None
) -> tuple[Any, list[int]]:
    """Write the header to `out`; the csv writer for the rows and the classes' columns."""
    if positive is not None and positive not in classes:
        raise ValueError(f"--positive {positive!r} is not a class; classes: {list(classes)}")
    columns = list(range(len(classes))) if positive is None else [list(classes).index(positive)]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["id", *(classes[j] for j in columns)])
    return writer, columns
