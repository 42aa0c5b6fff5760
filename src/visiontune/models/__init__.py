"""Models: timm backbones with offline weights, the classifier head, and the model file."""

from visiontune.models.backbone import (
    WeightsInfo,
    check_backbone_name,
    create_backbone,
    create_timm_model,
    resolve_data_config,
)
from visiontune.models.classifier import (
    ImageClassifier,
    ModelInfo,
    build_classifier,
    create_classifier,
    load_model_file,
    read_model_info,
    save_model_file,
)
from visiontune.models.head import create_head
from visiontune.models.weights import WeightsError

__all__ = [
    "ImageClassifier",
    "ModelInfo",
    "WeightsError",
    "WeightsInfo",
    "build_classifier",
    "check_backbone_name",
    "create_backbone",
    "create_classifier",
    "create_head",
    "create_timm_model",
    "load_model_file",
    "read_model_info",
    "resolve_data_config",
    "save_model_file",
]
