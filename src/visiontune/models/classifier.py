"""The full classifier (timm body + head) and its self-contained model file.

A model file is one safetensors file: the state dict plus JSON metadata (backbone name,
classes, data config, head shape, and how to predict with it: TTA views and precision), so
it loads with no pretrained weights and no pickle. Loading one needs torch, timm and
safetensors only: a served model ships this module (the params code loads lazily).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import timm
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from visiontune.data.transforms import DataConfig, PixelNormalize
from visiontune.models.head import create_head

if TYPE_CHECKING:
    from visiontune.models.backbone import WeightsInfo

FORMAT_VERSION = 1
METADATA_KEY = "visiontune"


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


PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass(frozen=True)
class InferenceSettings:
    """How the model is meant to predict: `n_augment` TTA views besides the centre crop
    (`tta_views`), their `zoom`, and the compute `precision` (fp32 | bf16 | fp16).

    `visiontune predict` and the served MLflow model both read these from the model, so
    they cut the same views and compute at the same precision.
    """

    n_augment: int
    zoom: float
    precision: str

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.n_augment < 0 or self.zoom < 1:
            raise ValueError(f"need n_augment >= 0 and zoom >= 1, got {self}")

    def to_dict(self) -> dict[str, Any]:
        return {"n_augment": self.n_augment, "zoom": self.zoom, "precision": self.precision}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InferenceSettings:
        return cls(int(data["n_augment"]), float(data["zoom"]), str(data["precision"]))


# A model file written before the inference settings existed: the plain centre crop, fp32.
PLAIN = InferenceSettings(n_augment=0, zoom=1.0, precision="fp32")


@dataclass(frozen=True)
class ModelInfo:
    """Everything besides the tensors needed to rebuild and use a classifier."""

    backbone: str
    classes: list[str]
    data_config: DataConfig
    head_hidden: tuple[int, ...]
    head_dropout: float
    inference: InferenceSettings | None = None
    # Whether fine-tuning mirrored its images (`finetune.augment.flip`, resolved): the
    # mirrored TTA views are cut only then. A model file without it: True, as before.
    mirror: bool = True

    def to_dict(self) -> dict[str, Any]:
        data = {
            "backbone": self.backbone,
            "classes": list(self.classes),
            "data_config": self.data_config.to_dict(),
            "head_hidden": list(self.head_hidden),
            "head_dropout": self.head_dropout,
            "mirror": self.mirror,
        }
        if self.inference is not None:
            data["inference"] = self.inference.to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelInfo:
        inference = data.get("inference")
        return cls(
            backbone=str(data["backbone"]),
            classes=[str(c) for c in data["classes"]],
            data_config=DataConfig.from_dict(data["data_config"]),
            head_hidden=tuple(int(h) for h in data["head_hidden"]),
            head_dropout=float(data["head_dropout"]),
            inference=InferenceSettings.from_dict(inference) if inference else None,
            mirror=bool(data.get("mirror", True)),
        )


def create_classifier(
    backbone: str,
    weights: str,
    num_classes: int,
    *,
    hidden: Sequence[int],
    dropout: float,
    data_config: DataConfig | None = None,
) -> tuple[ImageClassifier, WeightsInfo]:
    """A pretrained body with a fresh head for `num_classes` (`hidden` and `dropout` as in
    `head.*`).

    The input normalisation is `data_config`'s, else the backbone's pretrained one.
    """
    from visiontune.models.backbone import create_backbone, pretrained_data_config

    body, info = create_backbone(backbone, weights)
    data_config = data_config or pretrained_data_config(body)
    head = create_head(body.num_features, num_classes, hidden, dropout)
    return ImageClassifier(PixelNormalize.from_config(data_config), body, head), info


def build_classifier(info: ModelInfo) -> ImageClassifier:
    """An untrained classifier with the architecture `info` describes (for loading into)."""
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
    metadata = {METADATA_KEY: json.dumps({"format_version": FORMAT_VERSION, **info.to_dict()})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def read_model_info(path: Path) -> ModelInfo:
    """The ModelInfo stored in a model file, without reading its tensors."""
    with safe_open(str(path), framework="pt") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    if raw is None:
        raise ValueError(f"{path} is not a visiontune model file (no '{METADATA_KEY}' metadata)")
    data = json.loads(raw)
    version = data.get("format_version")
    if version != FORMAT_VERSION:
        raise ValueError(
            f"{path} has model file format {version}; this visiontune reads format {FORMAT_VERSION}"
        )
    return ModelInfo.from_dict(data)


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
