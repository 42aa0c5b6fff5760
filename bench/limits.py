"""What this machine can do at best with the pipeline's own settings, measured in-process:
the forward and the train step on random uint8 pixels, and the loaders' decoding alone, built
with the library's own factories (the stages' backbone, precision, layout and batch sizes)."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from summary import limit_rates
from torch import nn

from visiontune.config import Params
from visiontune.data.images import is_image_name
from visiontune.data.transforms import PixelNormalize
from visiontune.runtime import Runtime, autocast, configure_memory, prepare_module, to_device


def timed(
    step: Callable[[], int], runtime: Runtime, warmup: int, repeats: int, steps: int
) -> dict[str, Any]:
    """Images/s of `step` (which returns the images it processed): the median of `repeats`
    runs of `steps` calls, after `warmup` untimed calls (oneDNN picks and caches its kernels
    on the first calls for a shape)."""
    sync = torch.cuda.synchronize if runtime.device.type == "cuda" else lambda: None
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        sync()  # times the kernels done, not queued
        start, images = time.perf_counter(), sum(step() for _ in range(steps))
        sync()
        rates.append(images / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "runs": rates}


def random_pixels(runtime: Runtime, batch_size: int, image_size: int) -> torch.Tensor:
    """A uint8 N×3×H×W batch of random pixels, the loaders' format, on the runtime's device."""
    shape = (batch_size, 3, image_size, image_size)
    return to_device(torch.randint(0, 256, shape, dtype=torch.uint8), runtime)


def forward_limit(
    body: nn.Module, runtime: Runtime, batch_size: int, image_size: int,
    warmup: int = 2, repeats: int = 3, steps: int = 4,
) -> dict[str, Any]:  # fmt: skip
    """Model-only inference images/s on random uint8 pixels (eval, inference_mode, autocast)."""
    body.eval()
    batch = random_pixels(runtime, batch_size, image_size)

    def step() -> int:
        with torch.inference_mode(), autocast(runtime):
            body(batch)
        return batch_size

    return {"batch_size": batch_size, **timed(step, runtime, warmup, repeats, steps)}


def sample_images(root: Path, count: int) -> list[Path]:
    """`count` image files spread evenly over the sorted files under `root`."""
    files = sorted(p for p in root.rglob("*") if is_image_name(p))
    stride = max(1.0, len(files) / count)
    return [files[int(i * stride)] for i in range(min(count, len(files)))]


def decode_limit(
    paths: Sequence[Path], transform: Callable, min_size: int | None, runtime: Runtime,
    batch_size: int, per_image_seeds: bool = False, repeats: int = 2,
) -> dict[str, Any]:  # fmt: skip
    """Images/s of the DataLoader alone (decode + resize + transform), no model: the median of
    `repeats` passes after one that warms the page cache and starts the workers."""
    from visiontune.data.dataset import ImageDataset, create_loader

    dataset = ImageDataset([str(p) for p in paths], [0] * len(paths), transform, min_size=min_size)
    rates = []
    for attempt in range(repeats + 1):
        loader = create_loader(
            dataset, batch_size, runtime, shuffle=False, seed=0, per_image_seeds=per_image_seeds
        )
        start = time.perf_counter()
        images = sum(len(batch[0]) for batch in loader)
        if attempt:
            rates.append(images / (time.perf_counter() - start))
    return {"images": len(paths), "batch_size": batch_size, "num_workers": runtime.num_workers,
            "images_per_s": statistics.median(rates), "runs": rates}  # fmt: skip


class LimitProbe:
    """The networks the limits are measured on, kept to measure again right before and after
    each stage (`around`): on shared cores the host's speed drifts (81-125 img/s in a day).
    The train step trains a copy of the body, not the one the forward runs."""

    def __init__(self, params: Params, num_classes: int) -> None:
        from visiontune.models.backbone import create_backbone, resolve_data_config
        from visiontune.models.classifier import ImageClassifier
        from visiontune.models.head import create_head
        from visiontune.precompute import pixel_encoder
        from visiontune.runtime import resolve_runtime

        self.params = params
        configure_memory(params.runtime)  # as each stage does, before any model is built
        self.runtime = resolve_runtime(params.base, params.runtime)
        body, self.weights = create_backbone(params.model.backbone, params.model.weights)
        self.data_config = resolve_data_config(body, params.model)
        self.image_size = self.data_config.image_size
        # Both take uint8 pixels behind a PixelNormalize layer, as in the stages.
        self.body = prepare_module(pixel_encoder(body, self.data_config), self.runtime)
        head = create_head(body.num_features, num_classes, params.head.hidden, params.head.dropout)
        network = ImageClassifier(
            PixelNormalize.from_config(self.data_config), copy.deepcopy(body), head
        )
        self.network = prepare_module(network, self.runtime)
        self.num_classes = num_classes

    def forward(self, batch_size: int, **timing: int) -> dict[str, Any]:
        return forward_limit(self.body, self.runtime, batch_size, self.image_size, **timing)

    def train_step(self, warmup: int = 2, repeats: int = 3, steps: int = 3) -> dict[str, Any]:
        """The bare step of the whole network (forward, backward, SGD), BatchNorm as finetune
        sets it: what the fine-tune's epochs are compared with."""
        from visiontune.train.epoch import set_train_mode

        batch_size, runtime = self.params.finetune.batch_size, self.runtime
        set_train_mode(self.network, self.params.finetune.freeze_bn)
        self.network.requires_grad_(True)
        optimizer = torch.optim.SGD(self.network.parameters(), lr=1e-4, momentum=0.9)
        batch = random_pixels(runtime, batch_size, self.image_size)
        labels = torch.randint(0, self.num_classes, (batch_size,), device=runtime.device)

        def step() -> int:
            optimizer.zero_grad(set_to_none=True)
            with autocast(runtime):
                loss = nn.functional.cross_entropy(self.network(batch).float(), labels)
            loss.backward()
            optimizer.step()
            return batch_size

        return {"batch_size": batch_size, **timed(step, runtime, warmup, repeats, steps)}

    def around(self, stage: str, steps: int = 2) -> dict[str, Any] | None:
        """A stage's limit measured now, shorter than at the start; None: it has none."""
        timing = {"warmup": 1, "repeats": 3, "steps": steps}
        if stage in ("precompute", "evaluate"):
            p = self.params
            bs = p.precompute.batch_size if stage == "precompute" else p.tta.batch_size
            return {"limit": "forward", **self.forward(bs, **timing)}
        if stage == "finetune":
            return {"limit": "train_step", **self.train_step(**timing)}
        return None


def measure_limits(
    probe: LimitProbe, image_dir: Path, decode_images: int = 384,
    timing: Mapping[str, int] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """All the limits for the probe's params. `timing` (`warmup`, `repeats`, `steps`) for the
    forward and train step: a GPU takes milliseconds a step, so it needs more steps."""
    from visiontune.data import transforms

    params, runtime, cfg = probe.params, probe.runtime, probe.data_config
    info: dict[str, Any] = {
        "backbone": params.model.backbone,
        "weights": probe.weights.source,
        "image_size": probe.image_size,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "num_workers": runtime.num_workers,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cpu": torch.backends.cpu.get_cpu_capability(),
    }
    print(f"  {info}", flush=True)
    batch_sizes = sorted({params.precompute.batch_size, params.tta.batch_size})
    forward = {str(bs): probe.forward(bs, **(timing or {})) for bs in batch_sizes}
    train = probe.train_step(**(timing or {}))
    paths = sample_images(image_dir, decode_images)
    augment = params.finetune.augment.model_copy(update={"flip": True})  # the costlier one
    decode = {
        "eval": decode_limit(paths, transforms.create_eval_transform(cfg),
                             cfg.resize_size, runtime, params.precompute.batch_size),
        "train": decode_limit(paths, transforms.create_train_transform(cfg, augment),
                              transforms.train_min_size(cfg, augment), runtime,
                              params.finetune.batch_size, per_image_seeds=True),
    }  # fmt: skip
    limits = {**info, "forward": forward, "train_step": train, "decode": decode}
    print(f"  {limit_rates(limits)}", flush=True)
    return limits
