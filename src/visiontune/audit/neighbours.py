"""Nearest neighbours in feature space, block by block: near-duplicates and outliers.

Features are centred on the train mean and scaled to unit length, so the cosine of two
images measures what they share beyond what every image of the set shares. The search
holds one block of similarities at a time (`block` rows × all rows) and keeps each row's
`k` nearest, so memory grows with N·k, not N².
"""

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
    """The `k` most similar other rows of each row (cosine on unit rows), blockwise."""
    n = len(rows)
    k = min(k, n - 1)
    index = np.zeros((n, max(k, 0)), dtype=np.int64)
    similarity = np.zeros((n, max(k, 0)), dtype=np.float32)
    if k <= 0:
        return Neighbours(index, similarity)
    for start in range(0, n, block):
        stop = min(start + block, n)
        sims = rows[start:stop] @ rows.T  # [block, N]
        sims[torch.arange(stop - start), torch.arange(start, stop)] = -2.0  # not itself
        top = sims.topk(k, dim=1)
        index[start:stop] = top.indices.numpy()
        similarity[start:stop] = top.values.numpy()
    return Neighbours(index, similarity)


def candidate_pairs(neighbours: Neighbours, top: int) -> list[tuple[int, int, float]]:
    """Each pair (i < j) with j among i's `top` nearest or i among j's, once, with its cosine."""
    pairs: dict[tuple[int, int], float] = {}
    index, similarity = neighbours.index[:, :top], neighbours.similarity[:, :top]
    for i, (others, cosines) in enumerate(zip(index.tolist(), similarity.tolist(), strict=True)):
        for j, cosine in zip(others, cosines, strict=True):
            pairs[(min(i, j), max(i, j))] = cosine
    return [(i, j, cosine) for (i, j), cosine in sorted(pairs.items())]


def isolation(neighbours: Neighbours, k: int) -> np.ndarray:
    """1 − mean cosine to the `k` nearest rows: large for an image far from all others."""
    return 1.0 - neighbours.similarity[:, :k].mean(axis=1)
