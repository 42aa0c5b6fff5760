"""A submission table's format: `id`, then the probability of each class in class order, or
of the positive class alone. `visiontune predict --submission` and the predict_test stage
write it; no torch here, so a stage with no test images writes the header in a blink."""

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
