"""The accuracy baseline beside every result, what the head must at least reach:
StandardScaler + LogisticRegressionCV(cv=3) on the cached train features (C chosen on train
folds only), scored on the validation features."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from sklearn.linear_model import LogisticRegressionCV
from sklearn.metrics import log_loss
from sklearn.preprocessing import StandardScaler


def logistic_baseline(features_path: Path) -> dict[str, Any]:
    """Valid accuracy and log loss of the baseline on a visiontune feature cache."""
    with safe_open(str(features_path), framework="pt") as handle:
        x, y, vx, vy = (
            handle.get_tensor(name).float().numpy()
            for name in ("train_x", "train_y", "valid_x", "valid_y")
        )
    scaler = StandardScaler().fit(x)
    model = LogisticRegressionCV(
        cv=3, max_iter=1000, scoring="accuracy", l1_ratios=(0.0,), use_legacy_attributes=False
    ).fit(scaler.transform(x), y.astype(int))
    probs = model.predict_proba(scaler.transform(vx))
    labels = vy.astype(int)
    return {
        "accuracy": float(np.mean(model.classes_[probs.argmax(1)] == labels)),
        "loss": float(log_loss(labels, probs, labels=model.classes_)),
        "C": float(model.C_),
    }
