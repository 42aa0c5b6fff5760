"""Fine-tune loop on a few real photos: schedule applied per step, resume = uninterrupted run."""

from __future__ import annotations

import math
import threading

import pandas as pd
import pytest
import timm
import torch
from real_config import default_runtime, default_section

from visiontune.config import AugmentParams, FinetuneParams, LrFindParams
from visiontune.data.transforms import DataConfig, PixelNormalize
from visiontune.models.classifier import ImageClassifier
from visiontune.models.head import create_head
from visiontune.train.epoch import epoch_loader
from visiontune.train.loop import TrainingInterrupted, finetune
from visiontune.train.recipes import create_train_dataset, create_valid_loader, run_lr_find

CLASSES = ["cats", "dogs"]
DATA_CONFIG = DataConfig(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bilinear", 0.875)
PARAMS = default_section(FinetuneParams,
    n_cycles=2, cycle_len=1, cycle_mult=1, batch_size=4, warmup_pct=0.4, lr_ratios=(0.01, 0.1, 1),
    augment=default_section(AugmentParams, rotate_deg=10, max_zoom=1.2, flip=True),
)  # fmt: skip


def frame(root, split: str, per_class: int) -> pd.DataFrame:
    rows = [
        {"path": str(p), "label": c}
        for c in CLASSES
        for p in sorted((root / split / c).glob("*.jpg"))[:per_class]
    ]
    return pd.DataFrame(rows)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny batches: one thread is faster, and far faster when the CPU is shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(dogscats):
    runtime = default_runtime(num_workers=0)
    train = create_train_dataset(frame(dogscats, "train", 6), CLASSES, DATA_CONFIG, PARAMS.augment)
    valid = create_valid_loader(frame(dogscats, "valid", 2), CLASSES, DATA_CONFIG, 8, runtime, 0)
    return runtime, train, valid


def new_model() -> ImageClassifier:
    torch.manual_seed(0)
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    head = create_head(body.num_features, 2, (), 0.25)
    return ImageClassifier(PixelNormalize.from_config(DATA_CONFIG), body, head)


def run(data, tmp_path, stop_after: int | None = None, params=PARAMS, config=None, on_epoch=None):
    runtime, train, valid = data
    stop = threading.Event()
    if stop_after == 0:
        stop.set()

    def on_step(step: int) -> None:
        if stop_after is not None and step >= stop_after:
            stop.set()

    messages: list[str] = []
    result = finetune(
        new_model(), train, valid, params, runtime, lr=1e-2, seed=3, checkpoint_dir=tmp_path,
        config=config or {"finetune": params.model_dump(mode="json")},
        stop=stop, on_step=on_step, on_epoch=on_epoch, log=messages.append,
    )  # fmt: skip
    return result, messages


@pytest.fixture(scope="module")
def full_and_epochs(data, tmp_path_factory):
    epochs: list[dict] = []
    result, _ = run(data, tmp_path_factory.mktemp("full"), on_epoch=epochs.append)
    return result, epochs


@pytest.fixture(scope="module")
def full(full_and_epochs):
    return full_and_epochs[0]


def test_lr_applied_every_step_and_history(full):
    steps_per_epoch = 12 // 4
    assert len(full.steps) == 2 * steps_per_epoch
    assert list(full.steps.columns) == [
        "step",
        "epoch",
        "loss",
        "lr_group0",
        "lr_group1",
        "lr_group2",
    ]
    # the course warm-up (lr/100 for the first step of the first cycle), then SGDR restarts
    lrs = full.steps["lr_group2"].tolist()
    assert lrs[0] == pytest.approx(1e-4)
    assert lrs[1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(math.pi / 3)))
    assert lrs[steps_per_epoch] == pytest.approx(1e-2)
    ratios = (full.steps["lr_group0"] / full.steps["lr_group2"]).tolist()
    assert ratios == pytest.approx([0.01] * len(ratios))
    assert full.history["epoch"].tolist() == [0, 1]
    assert 0 <= full.metrics["valid_acc"] <= 1 and full.metrics["images_per_s"] > 0
    assert [g["name"] for g in full.layer_groups["groups"]] == ["body0", "body1", "head"]


def test_on_epoch_gets_each_history_row_as_it_completes(full_and_epochs):
    full, epochs = full_and_epochs
    assert [row["epoch"] for row in epochs] == [0, 1]
    assert set(epochs[0]) == set(full.history.columns)
    pd.testing.assert_frame_equal(pd.DataFrame(epochs), full.history)


def test_resume_after_interruption_equals_an_uninterrupted_run(data, full, tmp_path):
    before: list[dict] = []
    with pytest.raises(TrainingInterrupted):
        run(data, tmp_path, stop_after=4, on_epoch=before.append)  # in the second epoch
    after: list[dict] = []
    resumed, messages = run(data, tmp_path, on_epoch=after.append)
    assert resumed.resumed_from == 4
    # Each epoch is reported once, by the process that finished it.
    assert [row["epoch"] for row in before] == [0] and [row["epoch"] for row in after] == [1]
    assert any("resuming" in m for m in messages)
    pd.testing.assert_frame_equal(resumed.steps, full.steps)
    pd.testing.assert_frame_equal(
        resumed.history.drop(columns=["seconds", "images_per_s", "data_wait_share"]),
        full.history.drop(columns=["seconds", "images_per_s", "data_wait_share"]),
    )
    for (name, a), b in zip(
        full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_freeze_bn_and_a_changed_config_starts_fresh(data, full, tmp_path):
    fresh = new_model()
    # freeze_bn: the body's BatchNorm running stats stay the pretrained ones
    assert torch.equal(full.model.body.bn1.running_mean, fresh.body.bn1.running_mean)
    assert not torch.equal(full.model.body.conv_stem.weight, fresh.body.conv_stem.weight)
    with pytest.raises(TrainingInterrupted):
        run(data, tmp_path, stop_after=0)  # leaves a checkpoint at step 0
    unfrozen = PARAMS.model_copy(update={"freeze_bn": False})
    result, messages = run(data, tmp_path, params=unfrozen)
    assert result.resumed_from is None
    assert any(
        "config differs in finetune.freeze_bn" in m and "starting fresh" in m for m in messages
    )
    assert not torch.equal(result.model.body.bn1.running_mean, fresh.body.bn1.running_mean)


class CountingDataset(torch.utils.data.Dataset):
    def __init__(self, dataset) -> None:
        self.dataset, self.calls = dataset, 0

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        self.calls += 1
        return self.dataset[key]


def test_augmentation_is_the_same_with_any_number_of_workers(data):
    _, train, _ = data

    def epoch(workers: int) -> list[torch.Tensor]:
        runtime = default_runtime(num_workers=workers)
        return [images for images, _, _ in epoch_loader(train, 4, runtime, 3, 1)]

    rng = torch.get_rng_state()
    in_process = epoch(0)
    assert torch.equal(torch.get_rng_state(), rng), "loading drew from the caller's RNG"
    for a, b in zip(in_process, epoch(2), strict=True):
        assert torch.equal(a, b)


def test_each_pass_augments_anew_and_a_resumed_epoch_skips_without_decoding(data):
    runtime, train, _ = data
    loader = epoch_loader(train, 4, runtime, 3, 1)
    first, second = list(loader), list(loader)  # lr_find walks one loader several times
    for (a, _, index_a), (b, _, index_b) in zip(first, second, strict=True):
        assert torch.equal(index_a, index_b) and not torch.equal(a, b)
    counted = CountingDataset(train)
    rest = list(epoch_loader(counted, 4, runtime, 3, 1, skip_batches=1))
    assert counted.calls == 2 * 4
    for (a, _, _), (b, _, _) in zip(first[1:], rest, strict=True):
        assert torch.equal(a, b)


def test_a_checkpoint_of_another_format_starts_fresh(data, tmp_path):
    torch.save({"format_version": 1, "step": 4}, tmp_path / "last.pt")
    result, messages = run(data, tmp_path)
    assert result.resumed_from is None
    assert any("checkpoint format 1" in m and "starting fresh" in m for m in messages)


def test_lr_find_on_the_full_network_restores_it(data):
    runtime, train, _ = data
    model = new_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = default_section(LrFindParams, num_iter=6, batch_size=4, start_lr=1e-5, end_lr=1.0)
    result = run_lr_find(model, train, PARAMS, params, runtime, seed=0)
    assert 1 <= len(result.curve) <= 6
    assert set(result.suggestions) == {"min/10", "steepest", "valley", "slide", "takeoff/30"}
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
