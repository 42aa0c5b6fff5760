"""Nearest neighbours by cosine of train-centred features (what two images share beyond what
all share), for near-duplicates and outliers; block by block, so memory grows with N·k."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Neighbours:
    """Each row's `k` most similar other rows, most similar first."""

    index: np.ndarray  # [N, k] int64
    similarity: np.ndarray  # [N, k] cosine of the centred features


def unit_rows(features: np.ndarray, centre: np.ndarray) -> torch.Tensor:
    """Centred, L2-normalised float32 rows (a zero row stays zero), in one new array."""
    rows = torch.from_numpy(np.asarray(features, dtype=np.float32) - centre.astype(np.float32))
    return rows.div_(rows.norm(dim=1, keepdim=True).clamp_min_(1e-12))


def nearest(rows: torch.Tensor, k: int, block: int = 1024) -> Neighbours:
    """The `k` most similar other rows of each unit row (by cosine)."""
    n = len(rows)
    k = max(min(k, n - 1), 0)
    index = np.zeros((n, k), dtype=np.int64)
    similarity = np.zeros((n, k), dtype=np.float32)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = rows[start:stop] @ rows.T  # [block, N]
        sims[torch.arange(stop - start), torch.arange(start, stop)] = -2.0  # not itself
        top = sims.topk(k, dim=1)
        index[start:stop] = top.indices.numpy()
        similarity[start:stop] = top.values.numpy()
    return Neighbours(index, similarity)
