"""The classifier head that sits on the pooled backbone features (fastai-style)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn


def create_head(
    in_features: int, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.25
) -> nn.Sequential:
    """BatchNorm → Dropout → Linear, with optional hidden blocks before the last Linear.

    Each hidden size adds Linear → ReLU → BatchNorm → Dropout, so `hidden=(512,)` gives
    fastai's BN → drop → Linear(512) → ReLU → BN → drop → Linear(num_classes). BatchNorm
    first re-centres features whose scale varies a lot between backbones.
    """
    if in_features < 1 or num_classes < 1:
        raise ValueError(
            f"need in_features >= 1 and num_classes >= 1, got {in_features}, {num_classes}"
        )
    layers: list[nn.Module] = [nn.BatchNorm1d(in_features), nn.Dropout(dropout)]
    width = in_features
    for size in hidden:
        layers += [
            nn.Linear(width, size),
            nn.ReLU(inplace=True),
            nn.BatchNorm1d(size),
            nn.Dropout(dropout),
        ]
        width = size
    layers.append(nn.Linear(width, num_classes))
    return nn.Sequential(*layers)
