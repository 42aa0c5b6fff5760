"""The default head recipe on real photos far from ImageNet: at least a logistic baseline.

The handwritten digits are no ImageNet class: the backbone's own classifier, re-labelled,
starts near chance there. The shipped `head` params must still reach what a plain
logistic regression reaches on the same cached features.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.linear_model import LogisticRegressionCV
from sklearn.preprocessing import StandardScaler

from visiontune.config import load_params
from visiontune.precompute import precompute_features
from visiontune.train.head_choice import train_head_on_features
from visiontune.train.mirror import mirror_symmetry

PER_CLASS = 30  # 20 train + 10 valid images of each digit


@pytest.fixture(scope="module")
def digit_features(shared_data: Path, repo_root: Path, tmp_path_factory: pytest.TempPathFactory):
    root = shared_data / "digits"
    rows = [
        {"path": f"{digit}/{name.name}", "label": str(digit), "part": i * 3 // PER_CLASS}
        for digit in range(10)
        for i, name in enumerate(sorted((root / str(digit)).glob("*.png"))[:PER_CLASS])
    ]
    table = pd.DataFrame(rows)
    where = tmp_path_factory.mktemp("digits")
    table[table.part < 2][["path", "label"]].to_csv(where / "train.csv", index=False)
    table[table.part == 2][["path", "label"]].to_csv(where / "valid.csv", index=False)
    params = load_params(repo_root / "params.yaml")
    features, _ = precompute_features(
        params.model,
        params.base,
        params.precompute,
        runtime_params=params.runtime.model_copy(update={"num_workers": 0}),
        train_csv=where / "train.csv",
        valid_csv=where / "valid.csv",
        classes=[str(d) for d in range(10)],
        image_root=root,
    )
    return features, params


def logistic_baseline(features) -> float:
    """StandardScaler + LogisticRegressionCV(cv=3) on the train features, scored on valid."""
    scaler = StandardScaler().fit(features.train_x.float().numpy())
    model = LogisticRegressionCV(
        cv=3, max_iter=1000, l1_ratios=(0.0,), scoring="accuracy", use_legacy_attributes=False
    ).fit(scaler.transform(features.train_x.float().numpy()), features.train_y.numpy())
    predicted = model.predict(scaler.transform(features.valid_x.float().numpy()))
    return float(np.mean(predicted == features.valid_y.numpy()))


@pytest.mark.slow  # precompute + both cross-validated starts: ~25-45 s on 2 cores
def test_default_head_reaches_the_logistic_baseline_far_from_imagenet(digit_features):
    features, params = digit_features
    assert features.source is not None  # the ImageNet classifier is there to tempt it
    result = train_head_on_features(features, params.head, params.base.seed, features.source)
    baseline = logistic_baseline(features)
    accuracy = result.metrics["valid_acc"]
    assert accuracy >= 0.1 + 0.5, result.metrics  # chance + 50 points
    assert accuracy >= baseline - 0.02, (accuracy, baseline, result.metrics)
    assert result.metrics["domain"] == "far"


@pytest.mark.slow  # shares the fixture's precompute
def test_digits_are_found_to_change_class_in_the_mirror_on_train_images(digit_features):
    """`flip: auto`: precompute mirrors the train images (all 200: fewer than the sample
    size), and the sign test on them turns flipping off, without the validation split."""
    features, params = digit_features
    n_train = len(features.train_y)
    assert features.mirror_rows.tolist() == list(range(n_train))
    assert features.mirror_x.shape == features.train_x.shape
    assert not torch.equal(features.mirror_x, features.train_x)
    test = mirror_symmetry(features, params.base.seed)
    assert not test.symmetric and test.lost > 2 * test.gained, test
