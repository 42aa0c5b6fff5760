"""visiontune: the fast.ai transfer-learning recipe as a reproducible DVC + MLflow pipeline."""

__version__ = "0.1.0"
