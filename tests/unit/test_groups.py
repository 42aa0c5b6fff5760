"""Layer groups map to the intended layers of real timm backbones and get the intended LRs."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from visiontune.models.head import create_head
from visiontune.train.groups import create_layer_groups, create_param_groups, layer_groups_report
from visiontune.train.schedules import group_lrs


class BodyHead(nn.Module):
    def __init__(self, backbone: str) -> None:
        super().__init__()
        self.body = timm.create_model(backbone, pretrained=False, num_classes=0)
        self.head = create_head(self.body.num_features, 2, (), 0.25)


@pytest.fixture(scope="module", params=["tf_efficientnet_lite0", "resnet18"])
def model(request) -> BodyHead:
    return BodyHead(request.param)


def test_groups_partition_parameters_in_network_order(model):
    groups = create_layer_groups(model, 3)
    assert [g.name for g in groups] == ["body0", "body1", "head"]
    names = [n for n, _ in model.named_parameters()]
    owned = [n for g in groups for n in g.param_names]
    assert sorted(owned) == sorted(names)
    assert all(n.startswith("head.") for n in groups[2].param_names)
    assert not any(n.startswith("head.") for g in groups[:2] for n in g.param_names)
    # early layers first: the stem is in group 0, the last stage in group 1
    stem = "body.conv_stem.weight" if "body.conv_stem.weight" in names else "body.conv1.weight"
    last = (
        "body.conv_head.weight"
        if "body.conv_head.weight" in names
        else "body.layer4.1.conv2.weight"
    )
    assert stem in groups[0].param_names
    assert last in groups[1].param_names
    # contiguous chunks of the matcher's groups
    assert groups[0].matcher_groups[-1] + 1 == groups[1].matcher_groups[0]


def test_resnet_split_matches_the_course(model):
    """fastai 0.7 split resnets after layer2: [stem, layer1, layer2], [layer3, layer4], head."""
    if not isinstance(model.body, timm.models.ResNet):
        pytest.skip("resnet-specific")
    groups = create_layer_groups(model, 3)
    assert {p.split(".")[1] for p in groups[0].prefixes} == {"conv1", "bn1", "layer1", "layer2"}
    assert {p.split(".")[1] for p in groups[1].prefixes} == {"layer3", "layer4"}


@pytest.mark.parametrize("n_groups", [2, 4, 5])
def test_any_number_of_groups(model, n_groups):
    groups = create_layer_groups(model, n_groups)
    assert len(groups) == n_groups
    assert all(g.param_names for g in groups)


def test_too_many_groups_is_a_clear_error(model):
    with pytest.raises(ValueError, match=r"finetune\.layer_groups"):
        create_layer_groups(model, 40)


def test_param_groups_get_the_intended_lrs(model):
    groups = create_layer_groups(model, 3)
    ratios = (0.01, 0.1, 1.0)
    param_groups = create_param_groups(model, groups, group_lrs(0.02, ratios), 1e-4)
    optimizer = torch.optim.SGD(param_groups, lr=1.0, momentum=0.9)
    by_id = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for group, ratio in zip(groups, ratios, strict=True):
        for name in group.param_names:
            assert by_id[id(params[name])] == pytest.approx(0.02 * ratio)
    report = layer_groups_report(model, groups, ratios)
    assert sum(g["n_params"] for g in report["groups"]) == sum(p.numel() for p in params.values())
    assert report["groups"][2]["lr_ratio"] == 1.0
