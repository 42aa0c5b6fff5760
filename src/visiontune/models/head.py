"""The classifier head that sits on the pooled backbone features (fastai-style)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def create_head(
    in_features: int, num_classes: int, hidden: Sequence[int] = (), dropout: float = 0.25
) -> nn.Sequential:
    """BN → Dropout → Linear; each `hidden` size adds Linear → ReLU → BN → Dropout before the
    last Linear (fastai's `hidden=(512,)`). BatchNorm first re-centres features whose scale
    varies a lot between backbones."""
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
    """p(source class | target class): the pretrained classifier's mean softmax per class on
    the train features (Co-Tuning, You et al., NeurIPS 2020); the mean over all rows for a
    class without any."""
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
    """Start a BN → dropout → Linear head as the backbone's own classifier, re-labelled by
    `category_relationship`: on classes the backbone was trained on, most of the way there.
    The BatchNorm takes the train features' statistics, folded into the Linear, so that in
    eval mode the head equals the re-labelled source classifier exactly. Returns the
    relationship [num_classes, source classes]."""
    norm, linear = head[0], head[-1]
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
