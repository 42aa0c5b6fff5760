"""Images → class probabilities, cut and computed as the model file says: `visiontune predict`
and the served MLflow model share the views, runtime, decoding and forward pass below, so
they agree by construction. Needs torch, torchvision, timm, safetensors, Pillow, numpy only."""

from __future__ import annotations

import base64
import math
import sys
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch

from visiontune.data.images import UnreadableImageError
from visiontune.data.pixels import decode_pixels
from visiontune.evaluate.tta import ViewMaker, average_views, forward_views, tta_views
from visiontune.models.classifier import (
    ImageClassifier,
    InferenceSettings,
    ModelInfo,
    RecordError,
    load_model_file,
)
from visiontune.runtime import (
    Runtime,
    cpu_supports_bf16,
    create_runtime,
    loader_workers,
    prepare_module,
)


def inference_settings(info: ModelInfo, where: str) -> InferenceSettings:
    """The TTA views and precision evaluate scored the model with (RecordError if the file
    at `where` is not one evaluate wrote)."""
    if info.inference is None:
        raise RecordError(
            f"{where} holds no inference settings: evaluate writes them, into "
            "outputs/evaluate/model.safetensors; predict with that file (or run `dvc repro "
            "evaluate`)"
        )
    return info.inference


def create_views(info: ModelInfo, settings: InferenceSettings, tta: bool = True) -> ViewMaker:
    """The model's views: `settings.n_augment` TTA views with `tta`, else the centre crop
    alone; mirrored views only where finetune trained on mirror images."""
    views = tta_views(settings.n_augment if tta else 0, info.trained_on_mirrors("the model"))
    return ViewMaker(info.data_config, views, settings.zoom)


def host_precision(precision: str, device: str = "auto") -> tuple[str, str | None]:
    """`precision` where this host runs it natively, else fp32 and a line that says so:
    bf16 on a CPU without native bf16 (emulated, several times slower), fp16 on a CPU, and
    either on a GPU that lacks it."""
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        native = precision == "fp16" or torch.cuda.is_bf16_supported()
    else:
        native = precision == "bf16" and cpu_supports_bf16()
    if precision == "fp32" or native:
        return precision, None
    where = "this GPU" if use_cuda else "this CPU"
    return "fp32", f"the model was evaluated at {precision}, which {where} lacks: fp32 instead"


def inference_runtime(precision: str, device: str = "auto", num_workers: int = 0) -> Runtime:
    """The stages' runtime for predicting at `precision` (fp32 | bf16 | fp16) on `device`
    (`auto`: CUDA when there is one)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' asked for but no CUDA device is available")
    return create_runtime(device=device, precision=precision, num_workers=num_workers)


def predicting_runtime(
    precision: str, device: str = "auto", num_workers: int = 0
) -> tuple[Runtime, str | None]:
    """`inference_runtime` at the recorded `precision`, or at fp32 where this host lacks it;
    the line that says so (None when it runs as recorded)."""
    runnable, note = host_precision(precision, device)
    return inference_runtime(runnable, device, num_workers), note


@dataclass
class ImagePredictor:
    """A loaded model with its views and runtime; `predict_bytes` is the served model's work."""

    model: ImageClassifier
    info: ModelInfo
    settings: InferenceSettings
    runtime: Runtime
    batch_size: int = 32

    @classmethod
    def from_file(cls, path: str | Path, device: str = "auto") -> ImagePredictor:
        """Load a model file at its own precision on `device`."""
        model, info = load_model_file(Path(path))
        settings = inference_settings(info, str(path))
        runtime, note = predicting_runtime(settings.precision, device)
        if note:
            print(f"visiontune: {note}", file=sys.stderr)
        return cls(prepare_module(model, runtime).eval(), info, settings, runtime)

    def predict_bytes(
        self, images: Sequence[bytes | str], tta: bool = True
    ) -> tuple[torch.Tensor, list[str]]:
        """Probabilities (N×C float32, NaN rows where unreadable) and each image's error ("" when
        fine) of encoded images (bytes, or base64 text). Decoding runs in threads (Pillow and
        TorchCodec release the GIL); the readable images go `batch_size` at a time through the
        model, in chunks of `batch_size` views, as `visiontune predict` forwards a loader batch."""
        views = create_views(self.info, self.settings, tta)
        n = len(images)
        workers = max(1, min(loader_workers("auto"), n))
        with ThreadPoolExecutor(max_workers=workers) as pool:
            decoded = list(pool.map(lambda item: _views_of(item, views), images))
        probs = torch.full((n, len(self.info.classes)), math.nan)
        good = [i for i, (stack, _) in enumerate(decoded) if stack is not None]
        for start in range(0, len(good), self.batch_size):
            rows = good[start : start + self.batch_size]
            batch = torch.stack([decoded[i][0] for i in rows])  # type: ignore[misc]
            view_probs = forward_views(self.model, batch, self.runtime, self.batch_size)
            probs[rows] = average_views(view_probs)
        return probs, [error for _, error in decoded]


def _views_of(item: bytes | str, views: ViewMaker) -> tuple[torch.Tensor | None, str]:
    """The views of one encoded image (bytes, or base64 text as JSON carries it), or why not."""
    if isinstance(item, str):
        try:
            item = base64.b64decode(item, validate=False)
        except ValueError:
            return None, "text that is not base64"
    if not isinstance(item, bytes | bytearray | memoryview):
        return None, f"not image bytes ({type(item).__name__})"
    try:
        return views(decode_pixels(bytes(item), min_size=views.min_decode_size)), ""
    except UnreadableImageError as exc:
        return None, exc.reason
