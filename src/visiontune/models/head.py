"""The classifier head that sits on the pooled backbone features (fastai-style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
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


@torch.no_grad()
def category_relationship(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    num_classes: int,
    source_weight: torch.Tensor,
    source_bias: torch.Tensor,
) -> torch.Tensor:
    """p(source class | target class): the pretrained classifier's mean softmax per class.

    Co-Tuning's (You et al., NeurIPS 2020) direct estimate, from the train features only.
    A class without train rows gets the mean over all rows.
    """
    probs = torch.softmax(train_x.float() @ source_weight.T + source_bias, dim=1)
    overall = probs.mean(0)
    rows = [
        probs[train_y == k].mean(0) if (train_y == k).any() else overall for k in range(num_classes)
    ]
    return torch.stack(rows)


@torch.no_grad()
def init_from_source(
    head: nn.Sequential,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    source_weight: torch.Tensor,
    source_bias: torch.Tensor,
) -> torch.Tensor:
    """Start a BN → dropout → Linear head as the backbone's own classifier, re-labelled.

    Each class's logit starts as the relationship-weighted sum of the source logits
    (`category_relationship`), so the head begins where the pretrained model already is:
    on a dataset whose classes the backbone was trained on, that is most of the way.
    The leading BatchNorm is set to the train features' statistics and folded into the
    Linear, so that in eval mode head(x) equals the re-labelled source classifier exactly.

    Returns:
        The relationship matrix [num_classes, source classes] (for the record).
    """
    norm, linear = head[0], head[-1]
    if len(head) != 3 or not isinstance(norm, nn.BatchNorm1d) or not isinstance(linear, nn.Linear):
        raise ValueError("init_from_source needs a BN → dropout → Linear head (hidden: [])")
    x = train_x.float()
    relation = category_relationship(x, train_y, linear.out_features, source_weight, source_bias)
    weight, bias = relation @ source_weight, relation @ source_bias
    mean, var = x.mean(0), x.var(0, unbiased=False)
    norm.reset_parameters()
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(var)
    linear.weight.copy_(weight * torch.sqrt(var + norm.eps))
    linear.bias.copy_(bias + weight @ mean)
    return relation
