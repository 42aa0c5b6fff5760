"""Layer groups for differential LRs from timm's `group_matcher`, for any backbone: the body's
matcher groups in `n_groups - 1` contiguous chunks, early layers first, then the head."""

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


def _matcher_groups(body: nn.Module, min_groups: int) -> list[list[str]]:
    """The body's parameters by timm matcher group, in network order (coarse if enough)."""
    if hasattr(body, "group_matcher"):
        for coarse in (True, False):
            grouped = group_parameters(body, body.group_matcher(coarse=coarse))
            groups = [list(names) for _, names in sorted(grouped.items())]
            if len(groups) >= min_groups:
                return groups
        return groups
    # A model without a matcher: its top-level children in definition order.
    children = [
        [f"{child}.{n}" for n, _ in module.named_parameters()]
        for child, module in body.named_children()
    ]
    return [names for names in children if names]


def create_layer_groups(model: nn.Module, n_groups: int) -> list[LayerGroup]:
    """Split a model with `.body` (timm, num_classes=0) and `.head` into `n_groups` groups."""
    matcher = _matcher_groups(model.body, n_groups - 1)
    if len(matcher) < n_groups - 1:
        raise ValueError(
            f"{type(model.body).__name__} has only {len(matcher)} layer groups in its "
            f"group_matcher; use finetune.layer_groups <= {len(matcher) + 1}"
        )
    groups = []
    for index, chunk in enumerate(np.array_split(np.arange(len(matcher)), n_groups - 1)):
        names = [f"body.{n}" for i in chunk for n in matcher[i]]
        # The module of each parameter, at most three levels deep.
        prefixes = dict.fromkeys(".".join(n.rsplit(".", 1)[0].split(".")[:3]) for n in names)
        matched = tuple(int(i) for i in chunk)
        groups.append(LayerGroup(index, f"body{index}", tuple(names), tuple(prefixes), matched))
    head_names = tuple(f"head.{n}" for n, _ in model.head.named_parameters())
    groups.append(LayerGroup(n_groups - 1, "head", head_names, ("head",)))
    owned = sorted(name for group in groups for name in group.param_names)
    names = sorted(name for name, _ in model.named_parameters())
    if owned != names:
        odd = sorted(set(owned) ^ set(names))[:5]
        raise RuntimeError(f"layer groups do not partition the parameters: {odd} ...")
    return groups


def create_param_groups(
    model: nn.Module, groups: Sequence[LayerGroup], base_lrs: Sequence[float], weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer param groups, one per layer group, tagged with `layer_group`."""
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
                "first": group.param_names[0],
                "last": group.param_names[-1],
            }
            for group, ratio in zip(groups, lr_ratios, strict=True)
        ],
    }
