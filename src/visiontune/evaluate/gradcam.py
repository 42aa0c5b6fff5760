"""Where the model looked: Grad-CAM (Selvaraju et al., 2017) of the fine-tuned classifier.

The map is the ReLU of the body's last feature map weighted by the spatially averaged
gradient of one class's logit. timm gives every backbone the same split of its forward
(`forward_features`: the last feature map; `forward_head`: pooling), so the map comes from
autograd on that split for any architecture: no per-model layer name and no hooks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from visiontune.models.classifier import ImageClassifier


def grad_cam(model: ImageClassifier, pixels: torch.Tensor, targets: Sequence[int]) -> torch.Tensor:
    """[len(targets), H, W] maps in [0, 1] of one image (uint8 [3, H, W], the pixels the
    model saw), one per target class: one forward, and per target a backward pass through
    the pooling and the head only (the map's gradient starts at the feature map)."""
    model.eval()
    with torch.no_grad():
        features = model.body.forward_features(model.normalize(pixels.unsqueeze(0)))
    features = features.float().requires_grad_()
    with torch.enable_grad():
        logits = model.head(model.body.forward_head(features, pre_logits=True))
        maps = []
        for n, target in enumerate(targets):
            (grads,) = torch.autograd.grad(
                logits[0, target], features, retain_graph=n < len(targets) - 1
            )
            weights = grads.mean(dim=(2, 3), keepdim=True)
            maps.append(F.relu((weights * features).sum(dim=1)).detach())
    cams = F.interpolate(torch.stack(maps), size=pixels.shape[-2:], mode="bilinear")[:, 0]
    peak = cams.flatten(1).amax(dim=1).clamp_min(1e-12)
    return (cams / peak[:, None, None]).float()
