"""Images → class probabilities, cut and computed as the model file says.

`visiontune predict` and the served MLflow model both go through here: the views come from
the model's inference settings (`create_views`), the device and precision from
`inference_runtime`, decoding from `open_pixels`/`decode_pixels` (the same decoder choice
for a file and for its bytes) and the forward pass from `forward_views`. So the two agree
by construction. Needs torch, torchvision, timm, safetensors, Pillow and numpy only.
"""

from __future__ import annotations

import base64
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from visiontune.data.images import UnreadableImageError
from visiontune.data.pixels import decode_pixels
from visiontune.evaluate.tta import ViewMaker, average_views, forward_views, tta_views
from visiontune.models.classifier import (
    PLAIN,
    ImageClassifier,
    InferenceSettings,
    ModelInfo,
    load_model_file,
)
from visiontune.runtime import Runtime, cpu_count, prepare_module

_AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def inference_settings(info: ModelInfo) -> InferenceSettings:
    """The model's TTA views and precision (a file written without them: plain crop, fp32)."""
    return info.inference or PLAIN


def create_views(info: ModelInfo, tta: bool = True) -> ViewMaker:
    """The model's views: its `n_augment` TTA views with `tta`, else the centre crop alone."""
    settings = inference_settings(info)
    views = tta_views(settings.n_augment if tta else 0, info.mirror)
    return ViewMaker(info.data_config, views, settings.zoom)


def inference_runtime(precision: str, device: str = "auto", num_workers: int = 0) -> Runtime:
    """Device (`auto`: CUDA when there is one), autocast dtype and memory format for
    predicting at `precision` (fp32 | bf16 | fp16), as the training stages lay tensors out."""
    if precision not in _AMP:
        raise ValueError(f"precision must be one of {', '.join(_AMP)}, got {precision!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for but no CUDA device is available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    amp_dtype = _AMP[precision]
    return Runtime(
        device=torch.device("cuda" if use_cuda else "cpu"),
        amp_dtype=amp_dtype,
        channels_last=not use_cuda or amp_dtype is not None,
        num_workers=num_workers,
        pin_memory=use_cuda,
        idle_workers=not use_cuda,
    )


@dataclass
class ImagePredictor:
    """A loaded model with its views and runtime; `predict_bytes` is the served model's work."""

    model: ImageClassifier
    info: ModelInfo
    runtime: Runtime
    batch_size: int = 32

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto") -> ImagePredictor:
        """Load a model file at its own precision on `device`."""
        model, info = load_model_file(Path(path))
        runtime = inference_runtime(inference_settings(info).precision, device)
        return cls(prepare_module(model, runtime).eval(), info, runtime)

    @property
    def classes(self) -> list[str]:
        return list(self.info.classes)

    def predict_bytes(
        self, images: Sequence[bytes | str], tta: bool = True
    ) -> tuple[torch.Tensor, list[str]]:
        """Probabilities (N×C float32, NaN rows for unreadable images) and the per-image
        error ("" when fine) for encoded images (bytes, or base64 text).

        Decoding runs in threads (Pillow and TorchCodec release the GIL); the views of
        all readable images go through the model `batch_size` images at a time.
        """
        views = create_views(self.info, tta)
        n = len(images)
        workers = max(1, min(cpu_count(), 8, n))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(pool.map(lambda item: _views_of(item, views), images))
        probs = torch.full((n, len(self.info.classes)), math.nan)
        errors = [error for _, error in decoded]
        good = [i for i, (stack, _) in enumerate(decoded) if stack is not None]
        for start in range(0, len(good), self.batch_size):
            rows = good[start : start + self.batch_size]
            batch = torch.stack([decoded[i][0] for i in rows])  # type: ignore[misc]
            # Chunks of `batch_size` views, as `visiontune predict` forwards a loader batch.
            chunk = self.batch_size
            probs[rows] = average_views(forward_views(self.model, batch, self.runtime, chunk))
        return probs, errors


def _views_of(item: bytes | str, views: ViewMaker) -> tuple[torch.Tensor | None, str]:
    try:
        data = _as_bytes(item)
        return views(decode_pixels(data, min_size=views.min_decode_size)), ""
    except UnreadableImageError as exc:
        return None, exc.reason


def _as_bytes(item: bytes | str) -> bytes:
    """Bytes as they are; text as base64 (what JSON carries); anything else is an error."""
    if isinstance(item, bytes | bytearray | memoryview):
        return bytes(item)
    if isinstance(item, str):
        try:
            return base64.b64decode(item, validate=False)
        except ValueError:
            raise UnreadableImageError("<text>", "text that is not base64") from None
    raise UnreadableImageError("<value>", f"not image bytes ({type(item).__name__})")
