"""Images on disk → batches: a dataset that decodes only as much JPEG as it needs, and loaders.

Decoding runs in DataLoader workers, seeded from one generator so that shuffling and
augmentation repeat exactly for a given seed.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from visiontune.data.images import UnreadableImageError, open_rgb
from visiontune.runtime import Runtime, lower_to_idle_priority, release_freed_memory


class ImageDataset(Dataset):
    """(image tensor, label or -1, index) for each path, decoded with `open_rgb`.

    `min_size` is the short side the transform needs: JPEGs are decoded in draft mode
    at the largest DCT reduction that keeps at least that many pixels (several times
    faster than a full decode of a large photo, and the transform downsizes anyway).
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None,
        transform: Callable[[Image.Image], torch.Tensor],
        min_size: int | None = None,
    ) -> None:
        self.paths = [str(path) for path in paths]
        self.labels = None if labels is None else [int(label) for label in labels]
        if self.labels is not None and len(self.labels) != len(self.paths):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")
        self.transform = transform
        self.min_size = min_size

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path = self.paths[index]
        try:
            image = open_rgb(Path(path), min_size=self.min_size)
        except UnreadableImageError as exc:
            # fetch only accepts readable images, so the file changed since then.
            raise UnreadableImageError(
                path, f"{exc.reason} (it was readable when fetched; re-run the fetch stage)"
            ) from None
        label = -1 if self.labels is None else self.labels[index]
        return self.transform(image), label, index


def _seed_worker(worker_id: int, idle: bool = False) -> None:
    # torch seeds each worker from the loader's generator; derive the other RNGs from it
    # so that numpy- or random-based transforms repeat too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    if idle:
        lower_to_idle_priority()


def create_loader(
    dataset: Dataset,
    batch_size: int,
    runtime: Runtime,
    *,
    shuffle: bool,
    seed: int,
    drop_last: bool = False,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader with the runtime's workers and pinning, reproducible for a given seed.

    A `sampler` (e.g. a DistributedSampler) replaces `shuffle`. With `runtime.idle_workers`
    the workers run at idle CPU priority (see `resolve_runtime`).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    workers = runtime.num_workers
    if workers > 0:
        release_freed_memory()  # the workers fork when the loader is first iterated
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        drop_last=drop_last,
        num_workers=workers,
        pin_memory=runtime.pin_memory,
        # Workers survive between epochs: re-forking them each epoch costs seconds.
        persistent_workers=workers > 0,
        prefetch_factor=4 if workers > 0 else None,
        generator=generator,
        worker_init_fn=(
            functools.partial(_seed_worker, idle=runtime.idle_workers) if workers > 0 else None
        ),
    )
