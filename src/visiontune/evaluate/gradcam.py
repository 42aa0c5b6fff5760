"""Where the model looked: Grad-CAM (Selvaraju et al., 2017) by autograd on timm's split of
every backbone's forward (`forward_features`, `forward_head`): no layer names, no hooks."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from visiontune.models.classifier import ImageClassifier


def grad_cam(model: ImageClassifier, pixels: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """[len(targets), H, W] maps in [0, 1] of one image (uint8 [3, H, W], the pixels the
    model saw), one per target class: the ReLU of the last feature map weighted by the
    spatial mean of the target logit's gradient, which only needs pooling and head."""
    model.eval()
    with torch.no_grad():
        features = model.body.forward_features(model.normalize(pixels.unsqueeze(0)))
    features = features.float().requires_grad_()
    with torch.enable_grad():
        logits = model.head(model.body.forward_head(features, pre_logits=True))
        maps = []
        for target in targets:
            (grads,) = torch.autograd.grad(logits[0, target], features, retain_graph=True)
            weights = grads.mean(dim=(2, 3), keepdim=True)
            maps.append(F.relu((weights * features).sum(dim=1)).detach())
    cams = F.interpolate(torch.stack(maps), size=pixels.shape[-2:], mode="bilinear")[:, 0]
    return cams / cams.flatten(1).amax(dim=1).clamp_min(1e-12)[:, None, None]
