"""Layer groups for differential LRs, derived from timm's `group_matcher` for any backbone.

The body's matcher groups (stem, stages/blocks, ...) are split into `n_groups - 1`
contiguous chunks, early layers first; the head is always the last group.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from timm.models import group_parameters
from torch import nn


@dataclass(frozen=True)
class LayerGroup:
    """One differential-LR group: the parameter names (of the whole model) it owns."""

    index: int
    name: str
    param_names: tuple[str, ...]
    # Module prefixes covered (e.g. `body.blocks.4`), for humans and layer_groups.json.
    prefixes: tuple[str, ...]
    matcher_groups: tuple[int, ...] = ()


def _prefix(name: str, depth: int = 2) -> str:
    parts = name.split(".")[:-1] or name.split(".")
    return ".".join(parts[:depth])


def _matcher_groups(body: nn.Module, min_groups: int) -> list[list[str]]:
    """The body's parameters by timm matcher group, in network order (coarse if enough)."""
    if hasattr(body, "group_matcher"):
        for coarse in (True, False):
            grouped = group_parameters(body, body.group_matcher(coarse=coarse))
            groups = [list(names) for _, names in sorted(grouped.items())]
            if len(groups) >= min_groups:
                return groups
        return groups
    # Not a timm model: its top-level children in definition order.
    children = [
        [f"{child}.{n}" for n, _ in module.named_parameters()]
        for child, module in body.named_children()
    ]
    return [names for names in children if names]


def create_layer_groups(model: nn.Module, n_groups: int) -> list[LayerGroup]:
    """Split a model with `.body` (timm, num_classes=0) and `.head` into `n_groups` groups."""
    if n_groups < 2:
        raise ValueError(
            f"n_groups must be >= 2 (at least one body group and the head), got {n_groups}"
        )
    body, head = model.body, model.head
    matcher = _matcher_groups(body, n_groups - 1)
    if len(matcher) < n_groups - 1:
        raise ValueError(
            f"{type(body).__name__} has only {len(matcher)} layer groups in its group_matcher; "
            f"use finetune.layer_groups <= {len(matcher) + 1}"
        )
    groups = []
    chunks = np.array_split(np.arange(len(matcher)), n_groups - 1)
    for index, chunk in enumerate(chunks):
        names = [f"body.{n}" for i in chunk for n in matcher[i]]
        prefixes = tuple(dict.fromkeys(_prefix(n, 3 if n.count(".") > 2 else 2) for n in names))
        groups.append(
            LayerGroup(index, f"body{index}", tuple(names), prefixes, tuple(int(i) for i in chunk))
        )
    head_names = tuple(f"head.{n}" for n, _ in head.named_parameters())
    groups.append(LayerGroup(n_groups - 1, "head", head_names, ("head",)))
    _check_partition(model, groups)
    return groups


def _check_partition(model: nn.Module, groups: Sequence[LayerGroup]) -> None:
    owned = [name for group in groups for name in group.param_names]
    all_names = [name for name, _ in model.named_parameters()]
    if sorted(owned) != sorted(all_names):
        missing = sorted(set(all_names) - set(owned))[:5]
        extra = sorted(set(owned) - set(all_names))[:5]
        raise RuntimeError(
            f"layer groups do not partition the parameters: missing {missing}, extra {extra}"
        )


def create_param_groups(
    model: nn.Module,
    groups: Sequence[LayerGroup],
    base_lrs: Sequence[float],
    weight_decay: float,
) -> list[dict[str, Any]]:
    """Optimizer param groups, one per layer group, tagged with `layer_group`."""
    if len(base_lrs) != len(groups):
        raise ValueError(f"{len(base_lrs)} learning rates for {len(groups)} layer groups")
    params = dict(model.named_parameters())
    return [
        {
            "params": [params[name] for name in group.param_names],
            "lr": lr,
            "weight_decay": weight_decay,
            "layer_group": group.index,
        }
        for group, lr in zip(groups, base_lrs, strict=True)
    ]


def layer_groups_report(
    model: nn.Module, groups: Sequence[LayerGroup], lr_ratios: Sequence[float]
) -> dict[str, Any]:
    """The group → layers mapping for layer_groups.json."""
    params = dict(model.named_parameters())
    return {
        "backbone": type(model.body).__name__,
        "groups": [
            {
                "index": group.index,
                "name": group.name,
                "lr_ratio": ratio,
                "prefixes": list(group.prefixes),
                "matcher_groups": list(group.matcher_groups),
                "n_tensors": len(group.param_names),
                "n_params": sum(params[n].numel() for n in group.param_names),
                "first": group.param_names[0] if group.param_names else None,
                "last": group.param_names[-1] if group.param_names else None,
            }
            for group, ratio in zip(groups, lr_ratios, strict=True)
        ],
    }
