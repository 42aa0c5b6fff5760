"""Image → tensor transforms: the eval pipeline (resize + centre crop) and training augmentation.

Both normalise with the backbone's own data config (`DataConfig`), never with constants.
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


def _to_normalised_tensor(cfg: DataConfig) -> list[Callable]:
    return [
        v2.ToImage(),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(mean=list(cfg.mean), std=list(cfg.std)),
    ]


def eval_min_size(cfg: DataConfig) -> int:
    """Smallest short side an image needs for the eval transform without upsampling."""
    return cfg.resize_size


def train_min_size(cfg: DataConfig, aug: AugmentParams) -> int:
    """Smallest short side the most zoomed-in training crop needs without upsampling."""
    return math.ceil(cfg.image_size * aug.max_zoom)


def create_eval_transform(cfg: DataConfig) -> Transform:
    """Resize the short side to `image_size / crop_pct`, centre-crop `image_size`, normalise."""
    mode = interpolation_mode(cfg.interpolation)
    return v2.Compose(
        [
            v2.Resize(cfg.resize_size, interpolation=mode, antialias=True),
            v2.CenterCrop(cfg.image_size),
            *_to_normalised_tensor(cfg),
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
    return v2.Compose([*steps, *_to_normalised_tensor(cfg)])
