"""Does a mirror image keep its class? For `flip: auto`: a one-sided sign test on held-out
folds of a train sample's features, as is and mirrored (a mirrored digit is no digit)."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from visiontune.evaluate.metrics import paired_change
from visiontune.features import FeatureSet
from visiontune.train.logreg import LOGREG_MAX_ITER, LOGREG_TOL, cv_folds

# Below this p the mirror changes classes: flip and the mirror TTA views go off. At 0.01,
# one mirror-symmetric set in a hundred loses its flip augmentation by chance.
MIRROR_P = 0.01
# One classifier judges both views of the same images, so its strength matters little.
MIRROR_C = 0.1


@dataclass(frozen=True)
class MirrorTest:
    """Held-out images the mirror turned right → wrong (`lost`) and wrong → right
    (`gained`), and the one-sided sign test's p-value for lost > gained."""

    lost: int
    gained: int
    p_value: float

    @property
    def symmetric(self) -> bool:
        """Whether a mirror image keeps its class, as far as the sample tells."""
        return self.p_value >= MIRROR_P

    def to_metrics(self) -> dict[str, Any]:
        return {
            "mirror_lost": self.lost,
            "mirror_gained": self.gained,
            "mirror_p": self.p_value,
            "mirror_symmetric": self.symmetric,
        }


def check_mirror_symmetry(
    x: torch.Tensor, mirrored: torch.Tensor, y: torch.Tensor, seed: int
) -> MirrorTest:
    """The sign test on train-sample features `x`, their mirror images' `mirrored`, labels `y`;
    a fold fitted on a single class is skipped, and with nothing to compare, p = 1."""
    features, flipped, labels = x.float().numpy(), mirrored.float().numpy(), y.numpy()
    plain, mirror = [np.zeros(0, dtype=bool)], [np.zeros(0, dtype=bool)]
    if len(labels) >= 6:  # three folds with at least two rows each
        for fit_rows, held_out in cv_folds(y, seed):
            if len(np.unique(labels[fit_rows])) < 2:
                continue
            model = make_pipeline(
                StandardScaler(),
                LogisticRegression(C=MIRROR_C, max_iter=LOGREG_MAX_ITER, tol=LOGREG_TOL),
            )
            with warnings.catch_warnings():
                # A test statistic, not the head: an unconverged fit still ranks the classes.
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.fit(features[fit_rows], labels[fit_rows])
            truth = labels[held_out]
            plain.append(model.predict(features[held_out]) == truth)
            mirror.append(model.predict(flipped[held_out]) == truth)
    change = paired_change(np.concatenate(plain), np.concatenate(mirror), alternative="less")
    return MirrorTest(change["lost"], change["gained"], change["p"])


def mirror_symmetry(features: FeatureSet, seed: int) -> MirrorTest:
    """The sign test on a feature cache's mirrored train sample (none cached: symmetric)."""
    if features.mirror_x is None or features.mirror_rows is None:
        return MirrorTest(0, 0, 1.0)
    rows = features.mirror_rows
    return check_mirror_symmetry(
        features.train_x[rows], features.mirror_x, features.train_y[rows], seed
    )
