"""`flip: auto`: whether a mirror image keeps its class, decided on train features alone,
and followed by the fine-tune, the model file and its TTA views."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from real_config import default_section
from records import fingerprint, model_info

from visiontune.config import FinetuneParams, HeadParams
from visiontune.features import FeatureSet, mirror_sample
from visiontune.models.record import ModelInfo, RecordError
from visiontune.train.head import load_head, save_head
from visiontune.train.head_choice import head_record, train_head_on_features
from visiontune.train.mirror import MIRROR_P, check_mirror_symmetry, mirror_symmetry
from visiontune.train.recipes import resolve_finetune


def separable(n: int, classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, 16, generator=g) * 2
    y = torch.arange(n) % classes
    return centers[y] + torch.randn(n, 16, generator=g), y


def test_a_mirror_that_keeps_the_class_passes_and_one_that_changes_it_does_not():
    x, y = separable(300, 4)
    g = torch.Generator().manual_seed(1)
    kept = check_mirror_symmetry(x, x + 0.3 * torch.randn(x.shape, generator=g), y, seed=0)
    assert kept.symmetric and kept.p_value >= MIRROR_P
    # The mirror of class k looks like class k + 1 (digits: a mirrored 2 is no 2).
    shifted, _ = separable(300, 4)
    swapped = shifted[(torch.arange(300) + 1) % 300]
    changed = check_mirror_symmetry(x, swapped, y, seed=0)
    assert not changed.symmetric and changed.lost > 100 and changed.gained < 10
    assert changed.to_metrics() == {
        "mirror_lost": changed.lost,
        "mirror_gained": changed.gained,
        "mirror_p": changed.p_value,
        "mirror_symmetric": False,
    }


def test_too_few_images_or_none_mirrored_count_as_symmetric():
    x, y = separable(5, 2)
    assert check_mirror_symmetry(x, -x, y, seed=0).p_value == 1.0
    features = FeatureSet(x, y, x, y, ["a", "b"], {})
    assert mirror_symmetry(features, seed=0).symmetric


def test_the_sample_is_every_row_up_to_its_size_then_a_seeded_subset():
    assert mirror_sample(7, seed=0).tolist() == list(range(7))
    rows = mirror_sample(50_000, seed=3)
    assert len(rows) == 1000 and rows.unique().numel() == 1000
    assert torch.equal(rows, rows.sort().values) and torch.equal(rows, mirror_sample(50_000, 3))


def _head_file(tmp_path: Path, mirrored: torch.Tensor) -> Path:
    x, y = separable(120, 3)
    features = FeatureSet(
        x[:90], y[:90], x[90:], y[90:], ["a", "b", "c"], fingerprint(),
        mirror_rows=torch.arange(90), mirror_x=mirrored[:90],
    )  # fmt: skip
    params = default_section(HeadParams, init="logreg")
    result = train_head_on_features(features, params, seed=0)
    path = tmp_path / "head.safetensors"
    save_head(path, result.head, head_record(features, params, result))
    return path


@pytest.mark.parametrize("symmetric", [True, False])
def test_finetune_resolves_flip_auto_from_the_head_file(tmp_path: Path, symmetric: bool):
    x, _ = separable(120, 3)
    mirrored = x if symmetric else x[(torch.arange(120) + 1) % 120]
    _, head = load_head(_head_file(tmp_path, mirrored))
    assert head.mirror_symmetric is symmetric
    ft = default_section(FinetuneParams)
    assert ft.augment.flip == "auto"  # the shipped default
    resolved = resolve_finetune(ft, head)
    assert resolved.augment.flip is symmetric
    assert resolved.lr_ratios != "auto"
    for explicit in (True, False):  # an explicit value is kept either way
        pinned = ft.model_copy(update={"augment": ft.augment.model_copy(update={"flip": explicit})})
        assert resolve_finetune(pinned, head).augment.flip is explicit


def test_a_model_file_says_whether_it_was_trained_on_mirrors(tmp_path: Path):
    info = model_info(mirror=False)
    assert ModelInfo.from_json(info.to_json(), "f", "rerun").mirror is False
    with pytest.raises(RecordError, match="is no fine-tuned model"):
        model_info(mirror=None).trained_on_mirrors("the head file")


def test_the_verdict_is_a_searchable_tag_of_the_head_run(tmp_path: Path):
    import json

    from visiontune.tracking.collect import collect

    metrics = {"init": "logreg", "domain": "far", "mirror_symmetric": False, "mirror_lost": 26}
    (tmp_path / "metrics.json").write_text(json.dumps(metrics))
    record = collect("train_head", tmp_path)
    assert record.tags["head.mirror_symmetric"] == "false"
    assert record.tags["head.domain"] == "far"
    assert record.metrics["head/mirror_lost"] == 26.0


def test_predict_and_the_served_model_cut_the_views_the_model_was_trained_for():
    from visiontune.models.classifier import InferenceSettings
    from visiontune.serving.predictor import create_views

    settings = InferenceSettings(n_augment=5, zoom=1.15, precision="fp32")
    for mirror, names in ((True, 6), (False, 5)):
        info = model_info(inference=settings, mirror=mirror)
        views = create_views(info, settings).views
        assert len(views) == names and any(v.flip for v in views) is mirror
