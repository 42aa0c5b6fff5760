"""The full classifier (timm body + head) and its self-contained model file.

A model file is one safetensors file: the state dict plus the model's record as JSON
metadata (`visiontune.models.record`: backbone, classes, data config, head shape, and how
to predict with it), so it loads with no pretrained weights and no pickle. Loading one
needs torch, timm and safetensors only: a served model ships this module (the params code
loads lazily).
"""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from visiontune.data.transforms import PixelNormalize
from visiontune.models.head import create_head
from visiontune.models.record import (
    METADATA_KEY,
    InferenceSettings,
    ModelInfo,
    RecordError,
    read_model_info,
)

__all__ = ["ImageClassifier", "InferenceSettings", "ModelInfo", "RecordError"]


class ImageClassifier(torch.nn.Module):
    """0-255 pixels → `normalize` → `body` (headless timm model → pooled features) → `head`.

    It takes the uint8 batches the loaders yield (N×3×H×W, any device) and returns logits.
    `normalize` holds no saved tensors, so the state dict is the body's and the head's.
    `head_stats_fixed`: the head's BatchNorm holds the statistics its linear layer was
    fitted with (a logistic-regression head); training keeps them (`set_train_mode`).
    """

    def __init__(
        self,
        normalize: PixelNormalize,
        body: torch.nn.Module,
        head: torch.nn.Module,
        head_stats_fixed: bool = False,
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.body = body
        self.head = head
        self.head_stats_fixed = head_stats_fixed

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.normalize(pixels)))


def build_classifier(info: ModelInfo) -> ImageClassifier:
    """An untrained classifier with the architecture `info` describes (for loading into).

    Training starts from `visiontune.train.recipes.load_classifier`: the pretrained body
    with train_head's head; this is the other way a classifier is built."""
    body = timm.create_model(info.backbone, pretrained=False, num_classes=0)
    head = create_head(body.num_features, len(info.classes), info.head_hidden, info.head_dropout)
    return ImageClassifier(PixelNormalize.from_config(info.data_config), body, head)


def save_model_file(path: Path, model: ImageClassifier, info: ModelInfo) -> None:
    """Write the classifier as one safetensors file with its ModelInfo as metadata (atomic)."""
    from visiontune.fileio import atomic_path

    num_outputs = model.head[-1].out_features
    if num_outputs != len(info.classes):
        raise ValueError(
            f"head has {num_outputs} outputs but info lists {len(info.classes)} classes"
        )
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={METADATA_KEY: info.to_json()})


def load_model_file(
    path: Path, map_location: str | torch.device = "cpu"
) -> tuple[ImageClassifier, ModelInfo]:
    """Rebuild a classifier from a model file (in eval mode); needs no pretrained weights."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    info = read_model_info(path)
    model = build_classifier(info)
    state: dict[str, torch.Tensor] = {}
    with safe_open(str(path), framework="pt", device="cpu") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            state[key] = handle.get_tensor(key)
    model.load_state_dict(state, strict=True)
    return model.to(map_location).eval(), info
