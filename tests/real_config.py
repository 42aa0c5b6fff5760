"""The repo's own params.yaml as typed config, shrunk per test: tests use the real values
(the schema has no defaults of its own) and change only what they are about."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from project_copy import deep_merge
from pydantic import BaseModel

from visiontune.config import BaseParams, Params, RuntimeParams, parse_params
from visiontune.runtime import Runtime, resolve_runtime

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
S = TypeVar("S", bound=BaseModel)


@cache
def _raw() -> dict[str, Any]:
    return yaml.safe_load(PARAMS_FILE.read_text(encoding="utf-8"))


# `overrides` deep-merged into a copy of a mapping: mappings merge, anything else replaces.
merge = deep_merge


def default_raw() -> dict[str, Any]:
    """A fresh copy of params.yaml as a plain mapping (to edit and write out)."""
    return copy.deepcopy(_raw())


def default_params(overrides: Mapping[str, Any] | None = None) -> Params:
    """params.yaml, validated, with `overrides` ({section: {key: value}}) merged in first."""
    return parse_params(merge(_raw(), overrides or {}))


def default_section(cls: type[S], **changes: Any) -> S:
    """The params.yaml section of type `cls` (e.g. HeadParams, AugmentParams) with `changes`
    applied and validated: `default_section(HeadParams, epochs=2)`."""
    section = _find(default_params(), cls)
    return cls.model_validate({**section.model_dump(), **changes})


def _find(model: BaseModel, cls: type[S]) -> S:
    """The first section of type `cls` in `model`, depth first (finetune.augment too)."""
    todo = [value for _, value in model]
    while todo:
        value = todo.pop(0)
        if isinstance(value, cls):
            return value
        if isinstance(value, BaseModel):
            todo += [inner for _, inner in value]
    raise LookupError(f"params.yaml has no {cls.__name__} section")


def default_runtime(**changes: Any) -> Runtime:
    """The resolved `Runtime` of params.yaml's `base` and `runtime` sections with `changes`
    (keys of either, e.g. `precision="fp32", num_workers=0`)."""
    base_keys = set(BaseParams.model_fields)
    base = default_section(BaseParams, **{k: v for k, v in changes.items() if k in base_keys})
    settings = default_section(
        RuntimeParams, **{k: v for k, v in changes.items() if k not in base_keys}
    )
    return resolve_runtime(base, settings)
