"""The model's record: one typed, versioned document that travels with the weights, written
by train_head, finetune and evaluate, from which every later reader takes its decisions.
Reading is strict: a defaulted field would, say, fine-tune a far domain with near-domain LRs.
No params code nor pydantic: a served model ships this module."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from safetensors import safe_open

# 2: weights identity, head fit, domain and mirror verdicts; the data config is the feature
#    cache's; every field is written, null where a stage has not filled it yet.
SCHEMA_VERSION = 2
METADATA_KEY = "visiontune"
RERUN = "re-run `dvc repro` (finetune and evaluate write the model files)"
PRECISIONS = ("fp32", "bf16", "fp16")
DOMAINS = ("near", "far")
HEAD_INITS = ("logreg", "source", "random")


@dataclass(frozen=True)
class DataConfig:
    """What the backbone expects: square input size, normalisation, resampling, crop."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        return cls(
            image_size=int(data["image_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
            crop_pct=float(data["crop_pct"]),
        )

    @property
    def resize_size(self) -> int:
        """Short side before the centre crop (timm's `floor(size / crop_pct)`)."""
        return math.floor(self.image_size / self.crop_pct)


class RecordError(ValueError):
    """A model record that this visiontune cannot use: the message says what to re-run."""


@dataclass(frozen=True)
class InferenceSettings:
    """How the model predicts: `n_augment` TTA views besides the centre crop, their `zoom`,
    and the compute `precision` (fp32 | bf16 | fp16) evaluate scored them at."""

    n_augment: int
    zoom: float
    precision: str

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.n_augment < 0 or self.zoom < 1:
            raise ValueError(f"need n_augment >= 0 and zoom >= 1, got {self}")


@dataclass(frozen=True)
class ModelInfo:
    """Everything besides the tensors needed to rebuild, fine-tune and use the classifier."""

    backbone: str
    weights_source: str
    # None: random init (`model.weights: none`), nothing to identify.
    weights_sha256: str | None
    classes: list[str]
    data_config: DataConfig
    head_in_features: int
    head_hidden: tuple[int, ...]
    head_dropout: float
    # A logistic fit keeps its BatchNorm statistics in fine-tuning (`head_stats_fixed`).
    head_init: str
    # train_head's verdicts: "near" when the backbone's own classifier nearly matches a
    # logistic fit (`lr_ratios: auto`); whether a mirror image keeps its class (`flip: auto`).
    domain: str
    mirror_symmetric: bool
    # finetune: whether it trained on mirror images (then TTA adds mirrored views).
    mirror: bool | None
    # evaluate: the views and precision it scored.
    inference: InferenceSettings | None

    def __post_init__(self) -> None:
        if self.domain not in DOMAINS:
            raise ValueError(f"domain must be one of {DOMAINS}, got {self.domain!r}")
        if self.head_init not in HEAD_INITS:
            raise ValueError(f"head_init must be one of {HEAD_INITS}, got {self.head_init!r}")

    def to_json(self) -> str:
        return json.dumps({"schema_version": SCHEMA_VERSION, **asdict(self)}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | None, where: str, rerun: str) -> ModelInfo:
        """The record in `text`, read from `where`; a RecordError says to run `rerun`."""
        if text is None:
            raise RecordError(f"{where} holds no visiontune model record; {rerun}")
        data = json.loads(text)
        version = data.pop("schema_version", data.pop("format_version", None))
        if version != SCHEMA_VERSION:
            raise RecordError(
                f"{where} has model record version {version}, this visiontune reads "
                f"{SCHEMA_VERSION}; {rerun}"
            )
        fields = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(fields - data.keys()), sorted(data.keys() - fields)
        if missing or unknown:
            raise RecordError(
                f"{where}: model record fields missing {missing}, unknown {unknown}; {rerun}"
            )
        try:
            return cls(
                backbone=str(data["backbone"]),
                weights_source=str(data["weights_source"]),
                weights_sha256=_optional(data["weights_sha256"], str),
                classes=[str(c) for c in data["classes"]],
                data_config=DataConfig.from_dict(data["data_config"]),
                head_in_features=int(data["head_in_features"]),
                head_hidden=tuple(int(h) for h in data["head_hidden"]),
                head_dropout=float(data["head_dropout"]),
                head_init=str(data["head_init"]),
                domain=str(data["domain"]),
                mirror_symmetric=_strict_bool(data["mirror_symmetric"]),
                mirror=_optional(data["mirror"], _strict_bool),
                inference=_optional(data["inference"], _inference),
            )
        except (TypeError, ValueError, KeyError) as exc:
            raise RecordError(f"{where}: malformed model record ({exc}); {rerun}") from None

    def trained_on_mirrors(self, where: str) -> bool:
        """`mirror`, failing when finetune has not filled it."""
        if self.mirror is None:
            raise RecordError(f"{where} is no fine-tuned model (run `dvc repro finetune`)")
        return self.mirror


def _optional(value: Any, convert):
    return None if value is None else convert(value)


def _strict_bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


def _inference(data: Mapping[str, Any]) -> InferenceSettings:
    if set(data) != {"n_augment", "zoom", "precision"}:
        raise ValueError(f"inference needs n_augment, zoom and precision, got {sorted(data)}")
    return InferenceSettings(int(data["n_augment"]), float(data["zoom"]), str(data["precision"]))


def read_model_info(path: str | Path, rerun: str = RERUN) -> ModelInfo:
    """A model or head file's record, read without its tensors or torch (else RecordError)."""
    with safe_open(str(path), framework="numpy") as handle:
        raw = (handle.metadata() or {}).get(METADATA_KEY)
    return ModelInfo.from_json(raw, str(path), rerun)
