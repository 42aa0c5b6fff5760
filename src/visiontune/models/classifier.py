"""The full classifier (timm body + head) and its model file: one safetensors file, the state
dict plus the model's record as metadata, loaded without pretrained weights or pickle, from
torch, timm and safetensors alone (a served model ships this module)."""

from __future__ import annotations

from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

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
    """uint8 N×3×H×W pixels → `normalize` (no saved tensors) → `body` (headless timm model)
    → `head` → logits. `head_stats_fixed`: the head's BatchNorm holds the statistics a
    logistic fit was made with, so training keeps them (`set_train_mode`)."""

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
    """An untrained classifier of the architecture `info` describes, to load a file into
    (training starts from `visiontune.train.recipes.load_classifier` instead)."""
    body = timm.create_model(info.backbone, pretrained=False, num_classes=0)
    head = create_head(body.num_features, len(info.classes), info.head_hidden, info.head_dropout)
    return ImageClassifier(PixelNormalize.from_config(info.data_config), body, head)


def save_model_file(path: Path, model: ImageClassifier, info: ModelInfo) -> None:
    """Write the classifier as one safetensors file with its ModelInfo as metadata (atomic)."""
    from visiontune.fileio import atomic_path  # pandas and pydantic: not needed to load

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
    if not Path(path).is_file():
        raise FileNotFoundError(f"model file not found: {path}")
    info = read_model_info(path)
    model = build_classifier(info)
    model.load_state_dict(load_file(str(path), device="cpu"), strict=True)
    return model.to(map_location).eval(), info
