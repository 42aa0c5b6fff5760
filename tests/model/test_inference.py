"""Dataset, loaders and the inference loop on a few real photos."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from real_config import default_runtime

from visiontune.data.dataset import ImageDataset, create_loader
from visiontune.data.images import UnreadableImageError
from visiontune.data.transforms import DataConfig, PixelNormalize, create_eval_transform
from visiontune.inference import run_inference

DATA = DataConfig(64, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5), "bicubic", 0.875)


@pytest.fixture(scope="module")
def photos(dogscats: Path) -> list[Path]:
    cats = sorted((dogscats / "valid" / "cats").glob("*.jpg"))[:3]
    dogs = sorted((dogscats / "valid" / "dogs").glob("*.jpg"))[:3]
    return cats + dogs


def test_dataset_yields_image_label_index(photos) -> None:
    dataset = ImageDataset(photos, [0, 0, 0, 1, 1, 1], create_eval_transform(DATA), min_size=73)
    image, label, index = dataset[4]
    assert image.shape == (3, 64, 64) and label == 1 and index == 4
    assert image.dtype == torch.uint8  # pixels; the model's first layer normalises
    unlabelled = ImageDataset(photos, None, create_eval_transform(DATA))
    assert unlabelled[0][1] == -1
    with pytest.raises(ValueError, match="6 paths but 2 labels"):
        ImageDataset(photos, [0, 1], create_eval_transform(DATA))


def test_an_image_broken_after_fetch_names_its_path(tmp_path: Path) -> None:
    broken = tmp_path / "gone.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = ImageDataset([broken], [0], create_eval_transform(DATA))
    with pytest.raises(UnreadableImageError, match=r"gone\.jpg.*re-run the fetch stage"):
        dataset[0]


class Mean(torch.nn.Module):
    """A tiny deterministic 'backbone': per-channel means of the uint8 pixels."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.float().mean(dim=(2, 3))


@pytest.mark.parametrize("workers", [0, 2])
def test_inference_returns_dataset_order_even_when_shuffled(photos, workers: int) -> None:
    runtime = default_runtime(precision="fp32", num_workers=workers)
    dataset = ImageDataset(photos, [0, 0, 0, 1, 1, 1], create_eval_transform(DATA))
    loader = create_loader(dataset, 4, runtime, shuffle=True, seed=3)
    outputs, labels, speed = run_inference(Mean(), loader, runtime, desc="test")
    expected = torch.stack([dataset[i][0].float().mean(dim=(1, 2)) for i in range(len(dataset))])
    assert torch.allclose(outputs, expected, atol=1e-6)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1] and speed > 0
    assert outputs.dtype == torch.float32


def test_bf16_inference_returns_float32(photos) -> None:
    runtime = default_runtime(precision="bf16", num_workers=0)
    dataset = ImageDataset(photos[:2], None, create_eval_transform(DATA))
    conv = torch.nn.Sequential(
        PixelNormalize.from_config(DATA),
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
    )
    outputs, labels, _ = run_inference(
        conv, create_loader(dataset, 2, runtime, shuffle=False, seed=0), runtime
    )
    assert outputs.shape == (2, 4) and outputs.dtype == torch.float32
    assert labels.tolist() == [-1, -1]


def test_loader_shuffle_repeats_for_a_seed(photos) -> None:
    runtime = default_runtime(precision="fp32", num_workers=0)
    dataset = ImageDataset(photos, None, create_eval_transform(DATA))

    def order(seed: int) -> list[int]:
        loader = create_loader(dataset, 6, runtime, shuffle=True, seed=seed)
        return next(iter(loader))[2].tolist()

    assert order(1) == order(1)
    assert order(1) != order(2)


def test_inference_over_a_subset_keeps_the_subset_order(photos) -> None:
    runtime = default_runtime(precision="fp32", num_workers=0)
    dataset = ImageDataset(photos, [0, 0, 0, 1, 1, 1], create_eval_transform(DATA))
    subset = torch.utils.data.Subset(dataset, [5, 1, 3])
    loader = create_loader(subset, 2, runtime, shuffle=False, seed=0)
    _, labels, _ = run_inference(Mean(), loader, runtime)
    assert labels.tolist() == [1, 0, 1]
    with pytest.raises(RuntimeError, match="drop_last"):
        run_inference(
            Mean(),
            create_loader(dataset, 4, runtime, shuffle=False, seed=0, drop_last=True),
            runtime,
        )
