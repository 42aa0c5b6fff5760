"""What this machine can do at best with the pipeline's own settings, measured in-process.

Model-only forward and train-step throughput on random uint8 pixels, and JPEG decode+resize
throughput of the loader alone, all built with visiontune's own runtime/model/data builders
so the limits use exactly the backbone, precision, memory format and batch sizes the stages use.
"""

from __future__ import annotations

import copy
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visiontune.config import Params
from visiontune.data.images import is_image_name
from visiontune.data.transforms import PixelNormalize
from visiontune.runtime import (
    Runtime,
    autocast,
    configure_memory,
    prepare_module,
    resolve_runtime,
    to_device,
)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (platform.processor() is often empty)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def timed(step: Callable[[], int], warmup: int, repeats: int, steps: int) -> dict[str, Any]:
    """Images/s of `step` (which returns the images it processed): median of `repeats` runs.

    Each run is `steps` calls after `warmup` untimed calls (oneDNN picks and caches its
    kernels on the first calls for a shape, so those are not representative).
    """
    for _ in range(warmup):
        step()
    rates = []
    for _ in range(repeats):
        start, images = time.perf_counter(), 0
        for _ in range(steps):
            images += step()
        rates.append(images / (time.perf_counter() - start))
    return {"images_per_s": statistics.median(rates), "runs": rates}


def random_pixels(batch_size: int, image_size: int) -> torch.Tensor:
    """A uint8 N×3×H×W batch of random pixels, the loaders' format."""
    return torch.randint(0, 256, (batch_size, 3, image_size, image_size), dtype=torch.uint8)


def freeze_batchnorm(module: nn.Module) -> None:
    """Put every BatchNorm in eval mode (running stats frozen), as finetune's freeze_bn does."""
    for child in module.modules():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            child.eval()


def forward_limit(
    body: nn.Module,
    runtime: Runtime,
    batch_size: int,
    image_size: int,
    warmup: int = 2,
    repeats: int = 3,
    steps: int = 4,
) -> dict[str, Any]:
    """Model-only inference images/s on random uint8 pixels (eval, inference_mode, autocast)."""
    body.eval()
    batch = to_device(random_pixels(batch_size, image_size), runtime)

    def step() -> int:
        with torch.inference_mode(), autocast(runtime):
            body(batch)
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        return batch_size

    return {"batch_size": batch_size, **timed(step, warmup, repeats, steps)}


def train_step_limit(
    model: nn.Module,
    runtime: Runtime,
    batch_size: int,
    image_size: int,
    num_classes: int,
    freeze_bn: bool,
    lr: float = 1.0e-4,
    warmup: int = 2,
    repeats: int = 3,
    steps: int = 3,
) -> dict[str, Any]:
    """Forward + backward + SGD step images/s on random uint8 pixels, whole network trainable."""
    model.train()
    if freeze_bn:
        freeze_batchnorm(getattr(model, "body", model))
    for param in model.parameters():
        param.requires_grad_(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=1.0e-4)
    batch = to_device(random_pixels(batch_size, image_size), runtime)
    labels = torch.randint(0, num_classes, (batch_size,), device=runtime.device)
    loss_fn = nn.CrossEntropyLoss()

    def step() -> int:
        optimizer.zero_grad(set_to_none=True)
        with autocast(runtime):
            loss = loss_fn(model(batch).float(), labels)
        loss.backward()
        optimizer.step()
        if runtime.device.type == "cuda":
            torch.cuda.synchronize()
        return batch_size

    return {"batch_size": batch_size, **timed(step, warmup, repeats, steps)}


def sample_images(root: Path, count: int) -> list[Path]:
    """`count` image files spread evenly over the sorted files under `root`."""
    files = sorted(p for p in root.rglob("*") if is_image_name(p))
    if len(files) <= count:
        return files
    stride = len(files) / count
    return [files[int(i * stride)] for i in range(count)]


def decode_limit(
    paths: Sequence[Path],
    transform: Callable,
    min_size: int | None,
    runtime: Runtime,
    batch_size: int,
    repeats: int = 2,
    per_image_seeds: bool = False,
) -> dict[str, Any]:
    """Images/s of the DataLoader alone (decode + resize + transform), no model.

    The first pass warms the page cache and starts the workers; the median of the
    next `repeats` passes is reported. `per_image_seeds` as the training loaders.
    """
    from visiontune.data.dataset import ImageDataset, create_loader

    dataset = ImageDataset([str(p) for p in paths], [0] * len(paths), transform, min_size=min_size)
    rates = []
    for attempt in range(repeats + 1):
        loader = create_loader(
            dataset, batch_size, runtime, shuffle=False, seed=0, per_image_seeds=per_image_seeds
        )
        start, images = time.perf_counter(), 0
        for batch in loader:
            images += len(batch[0])
        if attempt:
            rates.append(images / (time.perf_counter() - start))
    return {
        "images": len(paths),
        "batch_size": batch_size,
        "num_workers": runtime.num_workers,
        "images_per_s": statistics.median(rates),
        "runs": rates,
    }


class LimitProbe:
    """The backbone and network the limits are measured on, kept for re-measuring: on
    shared cores the host's speed drifts (81-125 img/s over a day), so each stage's limit is
    measured again right before and after it (`around`). Forward passes run on a copy of
    the pretrained weights that the train step never touches.
    """

    def __init__(self, params: Params, num_classes: int) -> None:
        from visiontune.models.backbone import create_backbone, resolve_data_config
        from visiontune.models.classifier import ImageClassifier
        from visiontune.models.head import create_head
        from visiontune.precompute import pixel_encoder

        self.params = params
        configure_memory(params.runtime)  # as each stage does, before any model is built
        self.runtime = resolve_runtime(params.base, params.runtime)
        body, self.weights = create_backbone(params.model.backbone, params.model.weights)
        self.data_config = resolve_data_config(body, params.model)
        # Both take uint8 pixels behind a PixelNormalize layer, as in the stages.
        self.body = prepare_module(pixel_encoder(body, self.data_config), self.runtime)
        head = create_head(
            int(body.num_features), num_classes, params.head.hidden, params.head.dropout
        )
        network = ImageClassifier(
            PixelNormalize.from_config(self.data_config), copy.deepcopy(body), head
        )
        self.network = prepare_module(network, self.runtime)
        self.num_classes = num_classes

    @property
    def image_size(self) -> int:
        return self.data_config.image_size

    def forward(self, batch_size: int, **timing: int) -> dict[str, Any]:
        return forward_limit(self.body, self.runtime, batch_size, self.image_size, **timing)

    def train_step(self, **timing: int) -> dict[str, Any]:
        return train_step_limit(
            self.network,
            self.runtime,
            self.params.finetune.batch_size,
            self.image_size,
            self.num_classes,
            self.params.finetune.freeze_bn,
            **timing,
        )

    def around(self, stage: str, steps: int = 2) -> dict[str, Any] | None:
        """The limit a stage's ratio is taken against, measured now (shorter than at the
        start: one warm-up call, 3 runs of `steps` steps), or None for a stage without one."""
        p = self.params
        if stage in ("precompute", "evaluate"):
            bs = p.precompute.batch_size if stage == "precompute" else p.tta.batch_size
            return {"limit": "forward", **self.forward(bs, warmup=1, repeats=3, steps=steps)}
        if stage == "finetune":
            return {"limit": "train_step", **self.train_step(warmup=1, repeats=3, steps=steps)}
        return None


def measure_limits(
    probe: LimitProbe,
    image_dir: Path,
    decode_images: int = 384,
    echo: bool = True,
    timing: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """All machine limits for the probe's params; see the module docstring.

    `timing` overrides the forward and train-step timing (`warmup`, `repeats`, `steps`):
    a GPU takes milliseconds per step, so its runs need more steps than a CPU's.
    """
    from visiontune.data.transforms import (
        create_eval_transform,
        create_train_transform,
        eval_min_size,
        train_min_size,
    )

    def say(text: str) -> None:
        if echo:
            print(f"  {text}", flush=True)

    params, runtime, data_cfg, size = (
        probe.params,
        probe.runtime,
        probe.data_config,
        probe.image_size,
    )
    info: dict[str, Any] = {
        "backbone": params.model.backbone,
        "weights": probe.weights.source,
        "image_size": size,
        "device": str(runtime.device),
        "precision": runtime.precision,
        "channels_last": runtime.channels_last,
        "num_workers": runtime.num_workers,
        "torch_threads": torch.get_num_threads(),
        "torch_version": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_model": cpu_model(),
    }
    say(
        f"{info['backbone']} {size}px, {info['precision']}, channels_last={runtime.channels_last}"
        f", torch threads {info['torch_threads']}, {info['cpu_model']}"
    )

    forward: dict[str, Any] = {}
    for batch_size in sorted({params.precompute.batch_size, params.tta.batch_size}):
        forward[str(batch_size)] = probe.forward(batch_size, **(timing or {}))
        say(f"forward   bs={batch_size:<3} {forward[str(batch_size)]['images_per_s']:7.1f} img/s")

    train = probe.train_step(**(timing or {}))
    say(f"train step bs={train['batch_size']:<3} {train['images_per_s']:7.1f} img/s")

    paths = sample_images(image_dir, decode_images)
    augment = params.finetune.augment
    decode = {
        "eval": decode_limit(
            paths,
            create_eval_transform(data_cfg),
            eval_min_size(data_cfg),
            runtime,
            params.precompute.batch_size,
        ),
        "train": decode_limit(
            paths,
            # auto resolves per dataset; the limit takes the costlier one, with flips.
            create_train_transform(data_cfg, augment.model_copy(update={"flip": True})),
            train_min_size(data_cfg, augment),
            runtime,
            params.finetune.batch_size,
            per_image_seeds=True,
        ),
    }
    for name, result in decode.items():
        say(
            f"decode {name:<16} {result['images_per_s']:7.1f} img/s "
            f"({result['num_workers']} workers)"
        )
    return {**info, "forward": forward, "train_step": train, "decode": decode}
