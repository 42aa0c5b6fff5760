"""Image → tensor transforms: the eval pipeline (resize + centre crop) and training augmentation.

Both end in uint8 CHW pixels; `PixelNormalize`, the model's first layer, normalises whole
batches with the backbone's own data config (`DataConfig`), never with constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visiontune.config import AugmentParams

Transform = Callable[[Image.Image], torch.Tensor]


@dataclass(frozen=True)
class DataConfig:
    """What the backbone expects: square input size, normalisation, resampling, crop."""

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str
    crop_pct: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DataConfig:
        return cls(
            image_size=int(data["image_size"]),
            mean=tuple(float(v) for v in data["mean"]),  # type: ignore[arg-type]
            std=tuple(float(v) for v in data["std"]),  # type: ignore[arg-type]
            interpolation=str(data["interpolation"]),
            crop_pct=float(data["crop_pct"]),
        )

    @property
    def resize_size(self) -> int:
        """Short side before the centre crop (timm's `floor(size / crop_pct)`)."""
        return math.floor(self.image_size / self.crop_pct)


def interpolation_mode(name: str) -> v2.InterpolationMode:
    try:
        return v2.InterpolationMode(name.lower())
    except ValueError:
        allowed = ", ".join(mode.value for mode in v2.InterpolationMode)
        raise ValueError(f"unknown interpolation {name!r}; allowed: {allowed}") from None


class PixelNormalize(torch.nn.Module):
    """0-255 pixels (a uint8 N×3×H×W batch, on any device) → float32 normalised with `mean`/`std`.

    `mean`/`std` are on the 0-1 scale, as in timm's data configs. One subtract-multiply on
    0-255 values, not torchvision's ToDtype(scale=True) → Normalize: a 64-image batch took
    24 ms against 40 (median of 15, 2 cores, 2026-12-01), and it keeps the exact numbers of
    the feature caches written before (torchvision's differ by up to 1.2e-7: a changed
    extraction, so a FEATURES_VERSION bump). It is the model's first layer, not a loader transform:
    workers hand over uint8 batches, a quarter of the bytes through shared memory, pinned
    memory and the host-to-device copy, and the normalisation runs on the model's device.
    """

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        # Not persistent: the model file stores mean/std in its data config, not as tensors.
        offset = torch.tensor([255 * m for m in mean]).view(1, 3, 1, 1)
        scale = torch.tensor([1 / (255 * s) for s in std]).view(1, 3, 1, 1)
        self.register_buffer("offset", offset, persistent=False)
        self.register_buffer("scale", scale, persistent=False)

    @classmethod
    def from_config(cls, cfg: DataConfig) -> PixelNormalize:
        return cls(cfg.mean, cfg.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # copy=True: a float input must not be normalised in place under its caller.
        images = pixels.to(torch.float32, copy=True)
        return images.sub_(self.offset).mul_(self.scale)


def eval_min_size(cfg: DataConfig) -> int:
    """Smallest short side an image needs for the eval transform without upsampling."""
    return cfg.resize_size


def train_min_size(cfg: DataConfig, aug: AugmentParams) -> int:
    """Smallest short side the most zoomed-in training crop needs without upsampling."""
    return math.ceil(cfg.image_size * aug.max_zoom)


def create_eval_transform(cfg: DataConfig) -> Transform:
    """Resize the short side to `image_size / crop_pct`, centre-crop `image_size` (uint8 CHW).

    The resize runs on the uint8 tensor, not the PIL image: torch's antialiased kernel
    took 0.25 ms against Pillow's 0.85-1.4 per dogscats photo (1 core), more than the
    JPEG decode itself, for the same pixels up to ~0.02 grey levels on average.
    """
    mode = interpolation_mode(cfg.interpolation)
    return v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(cfg.resize_size, interpolation=mode, antialias=True),
            v2.CenterCrop(cfg.image_size),
        ]
    )


class RandomZoomCrop(torch.nn.Module):
    """A random crop `zoom` times smaller than the short side, resized to a square.

    Unlike RandomResizedCrop, whose `scale` is a fraction of the whole area (so on a 4:3
    photo a square crop can never reach scale 1), the zoom is relative to the short
    side: zoom 1 is the largest square that fits, `max_zoom` the closest look.
    """

    def __init__(
        self,
        size: int,
        max_zoom: float,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
    ) -> None:
        super().__init__()
        self.size = size
        self.max_zoom = max_zoom
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.interpolation = interpolation

    def forward(self, img: Image.Image) -> Image.Image:
        width, height = F.get_size(img)[::-1]
        # Uniform in area (like RandomResizedCrop's scale), then a mild aspect jitter.
        area = torch.empty(1).uniform_(1 / self.max_zoom**2, 1).item()
        aspect = math.exp(torch.empty(1).uniform_(*self.log_ratio).item())
        side = min(width, height) * math.sqrt(area)
        crop_w = min(width, max(1, round(side * math.sqrt(aspect))))
        crop_h = min(height, max(1, round(side / math.sqrt(aspect))))
        top = int(torch.randint(0, height - crop_h + 1, (1,)).item())
        left = int(torch.randint(0, width - crop_w + 1, (1,)).item())
        return F.resized_crop(
            img,
            top,
            left,
            crop_h,
            crop_w,
            [self.size, self.size],
            interpolation=self.interpolation,
            antialias=True,
        )


def create_train_transform(cfg: DataConfig, aug: AugmentParams) -> Transform:
    """Side-on augmentation (the course's `transforms_side_on`): rotate, zoom crop, flip, light.

    Rotation comes first, on the full image, so a zoomed crop hides most of its corners.
    """
    mode = interpolation_mode(cfg.interpolation)
    steps: list[Callable] = []
    if aug.rotate_deg > 0:
        steps.append(v2.RandomRotation(aug.rotate_deg, interpolation=v2.InterpolationMode.BILINEAR))
    steps.append(RandomZoomCrop(cfg.image_size, aug.max_zoom, interpolation=mode))
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.brightness > 0 or aug.contrast > 0:
        steps.append(v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    return v2.Compose([*steps, v2.PILToTensor()])
