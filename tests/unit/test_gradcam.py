"""Grad-CAM points at the pixels that raised the class's logit, on any timm body."""

from __future__ import annotations

import torch
from records import model_info

from visiontune.evaluate.gradcam import grad_cam
from visiontune.models.classifier import ImageClassifier, build_classifier
from visiontune.models.record import DataConfig


class _TwoChannelBody(torch.nn.Module):
    """timm's split of the forward: the feature map is the (normalised) image itself."""

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return x[:, :2]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x.mean(dim=(2, 3))


def test_each_class_map_lights_where_its_evidence_is():
    # Class 0 reads channel 0, class 1 channel 1; the image has channel 0 bright on the
    # left, channel 1 bright on the right.
    head = torch.nn.Linear(2, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.eye(2))
    model = ImageClassifier(lambda x: x.float() / 255, _TwoChannelBody(), head)
    pixels = torch.zeros(3, 8, 8, dtype=torch.uint8)
    pixels[0, :, :4] = 200
    pixels[1, :, 4:] = 200
    left, right = grad_cam(model, pixels, [0, 1])
    assert left.shape == (8, 8)
    assert left[:, :4].min() == 1.0 and left[:, 4:].max() == 0.0
    assert right[:, 4:].min() == 1.0 and right[:, :4].max() == 0.0


def test_a_real_backbone_gives_bounded_maps_of_the_input_size():
    config = DataConfig(64, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)
    model = build_classifier(model_info(data_config=config))
    pixels = torch.randint(
        0, 256, (3, 64, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    maps = grad_cam(model, pixels, [1, 0])
    assert maps.shape == (2, 64, 64)
    assert float(maps.min()) >= 0.0 and float(maps.max()) <= 1.0
    assert not any(p.grad is not None for p in model.parameters())  # no weight gradients kept
