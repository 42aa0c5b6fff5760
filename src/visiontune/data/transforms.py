"""Image → tensor transforms: the eval pipeline (resize + centre crop) and training augmentation.

Both end in uint8 CHW pixels; `PixelNormalize`, the model's first layer, normalises whole
batches with the backbone's own data config (`DataConfig`), never with constants.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import TYPE_CHECKING

import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from visiontune.models.record import DataConfig

if TYPE_CHECKING:  # a served model ships this module without the params code
    from visiontune.config import AugmentParams

# A decoded image (uint8 3×H×W from `open_pixels`, or a Pillow RGB image) → uint8 3×H×W.
Transform = Callable[[torch.Tensor | Image.Image], torch.Tensor]


def interpolation_mode(name: str) -> v2.InterpolationMode:
    try:
        return v2.InterpolationMode(name.lower())
    except ValueError:
        allowed = ", ".join(mode.value for mode in v2.InterpolationMode)
        raise ValueError(f"unknown interpolation {name!r}; allowed: {allowed}") from None


class PixelNormalize(torch.nn.Module):
    """0-255 pixels (a uint8 N×3×H×W batch, on any device) → float32 normalised with `mean`/`std`.

    `mean`/`std` are on the 0-1 scale, as in timm's data configs. One subtract-multiply on
    0-255 values, not ToDtype(scale=True) → Normalize: 24 ms against 40 for a 64-image batch
    (2 cores), and the exact numbers of the feature caches (torchvision's differ by up to
    1.2e-7). The model's first layer, not a loader transform: uint8 batches are a quarter of
    the bytes through shared memory, pinning and the copy to the device.
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


def train_min_size(cfg: DataConfig, aug: AugmentParams) -> int:
    """Smallest short side the most zoomed-in training crop needs without upsampling."""
    return math.ceil(cfg.image_size * aug.max_zoom)


def eval_resize(pixels: torch.Tensor, cfg: DataConfig, size: int | None = None) -> torch.Tensor:
    """uint8 pixels (3×H×W or N×3×H×W, any device), short side resized to `size` (default
    `cfg.resize_size`), antialiased as timm resizes. On the tensor, not a PIL image: 0.25 ms
    against Pillow's 0.85-1.4 per dogscats photo (1 core), pixels within ~0.02 grey levels
    on average."""
    mode = interpolation_mode(cfg.interpolation)
    return F.resize(pixels, [size or cfg.resize_size], interpolation=mode, antialias=True)


def eval_crop(pixels: torch.Tensor, cfg: DataConfig) -> torch.Tensor:
    """`eval_resize`, then the centre `image_size` square: the one definition of what the
    model sees without TTA, for the loaders, TTA's first view and the report's pictures."""
    return F.center_crop(eval_resize(pixels, cfg), [cfg.image_size, cfg.image_size])


def create_eval_transform(cfg: DataConfig) -> Transform:
    interpolation_mode(cfg.interpolation)  # an unknown name fails here, not in a worker
    # A partial, not a lambda: loader workers started by spawn pickle the transform.
    return v2.Compose([v2.PILToTensor(), partial(eval_crop, cfg=cfg)])


class RandomZoomCrop(torch.nn.Module):
    """A random crop `zoom` times smaller than the short side, turned by up to ±`degrees`
    about its centre, resized to a square.

    Unlike RandomResizedCrop's `scale` (a share of the whole area, so a 4:3 photo's square
    crop never reaches 1), zoom 1 is the largest square that fits and `max_zoom` the
    closest look. Where the turned crop leaves the photo its corners are black. The turn
    and the crop are one affine resampling of the output pixels, after an antialiased
    downscale to about the output scale: turning the full photo first took 3 of 4 ms (a
    dogscats photo, 1 core; now 1.3).
    """

    def __init__(
        self,
        size: int,
        max_zoom: float,
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
        interpolation: v2.InterpolationMode = v2.InterpolationMode.BILINEAR,
        degrees: float = 0.0,
    ) -> None:
        super().__init__()
        self.size = size
        self.max_zoom = max_zoom
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
        self.interpolation = interpolation
        self.degrees = degrees

    def forward(self, img: torch.Tensor | Image.Image) -> Image.Image:
        pixels = img if isinstance(img, torch.Tensor) else F.pil_to_tensor(img)
        height, width = pixels.shape[-2:]
        # Uniform in area (like RandomResizedCrop's scale), then a mild aspect jitter.
        area = torch.empty(1).uniform_(1 / self.max_zoom**2, 1).item()
        aspect = math.exp(torch.empty(1).uniform_(*self.log_ratio).item())
        side = min(width, height) * math.sqrt(area)
        crop_w = min(width, max(1, round(side * math.sqrt(aspect))))
        crop_h = min(height, max(1, round(side / math.sqrt(aspect))))
        top = int(torch.randint(0, height - crop_h + 1, (1,)).item())
        left = int(torch.randint(0, width - crop_w + 1, (1,)).item())
        angle = torch.empty(1).uniform_(-self.degrees, self.degrees).item() if self.degrees else 0.0
        # The affine step interpolates without antialiasing: shrink first, so that it
        # scales by at most the aspect jitter.
        shrink = min(crop_w, crop_h) / self.size
        box = (float(left), float(top), float(crop_w), float(crop_h))
        if shrink > 1:
            new_w, new_h = max(1, round(width / shrink)), max(1, round(height / shrink))
            pixels = F.resize(pixels, [new_h, new_w], self.interpolation, antialias=True)
            sx, sy = new_w / width, new_h / height
            box = (left * sx, top * sy, crop_w * sx, crop_h * sy)
        return Image.fromarray(pixels.permute(1, 2, 0).numpy()).transform(
            (self.size, self.size),
            Image.Transform.AFFINE,
            _crop_affine(box, angle, self.size),
            resample=Image.Resampling.BILINEAR,
        )


def _crop_affine(
    box: tuple[float, float, float, float], angle: float, size: int
) -> tuple[float, ...]:
    """Pillow's AFFINE data (output pixel → source pixel) that maps a size×size output onto
    the `box` (left, top, width, height), turned by `angle` degrees about its centre."""
    left, top, box_w, box_h = box
    cx, cy = left + box_w / 2, top + box_h / 2
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    kx, ky = box_w / size, box_h / size
    a, b, d, e = cos * kx, -sin * ky, sin * kx, cos * ky  # Pillow's names for them
    half = size / 2
    return (a, b, cx - (a + b) * half, d, e, cy - (d + e) * half)


def create_train_transform(cfg: DataConfig, aug: AugmentParams) -> Transform:
    """Side-on augmentation (the course's `transforms_side_on`): rotate, zoom crop, flip, light."""
    mode = interpolation_mode(cfg.interpolation)
    steps: list[Callable] = [
        RandomZoomCrop(cfg.image_size, aug.max_zoom, interpolation=mode, degrees=aug.rotate_deg)
    ]
    if aug.flip == "auto":
        raise ValueError("finetune.augment.flip: auto is decided by train_head (resolve_finetune)")
    if aug.flip:
        steps.append(v2.RandomHorizontalFlip())
    if aug.brightness > 0 or aug.contrast > 0:
        steps.append(v2.ColorJitter(brightness=aug.brightness, contrast=aug.contrast))
    return v2.Compose([*steps, v2.PILToTensor()])
