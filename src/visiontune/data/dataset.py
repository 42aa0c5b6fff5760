"""Images on disk → batches: a dataset that decodes only as much JPEG as it needs, and loaders.

Decoding runs in DataLoader workers. Shuffling comes from one seeded generator; training
augmentation from a seed per image and pass (`PerImageSeeds`), so it repeats exactly for
a given seed whatever the number of workers or processes.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import (
    DataLoader,
    Dataset,
    RandomSampler,
    Sampler,
    SequentialSampler,
    get_worker_info,
)

from visiontune.data.images import UnreadableImageError
from visiontune.data.pixels import open_pixels
from visiontune.runtime import Runtime, lower_to_idle_priority, release_freed_memory


class ImageDataset(Dataset):
    """(image tensor, label or -1, index) for each path, decoded with `open_pixels`: the
    transform gets uint8 3×H×W pixels.

    `min_size` is the short side the transform needs: JPEGs are decoded in draft mode
    at the largest DCT reduction that keeps at least that many pixels (several times
    faster than a full decode of a large photo, and the transform downsizes anyway).

    A key is an index, or an `(index, seed)` pair from `PerImageSeeds`: the transform then
    draws from RNGs seeded with `seed`, and the caller's RNG states are left as they were.
    """

    def __init__(
        self,
        paths: Sequence[str | Path],
        labels: Sequence[int] | None,
        transform: Callable[[torch.Tensor], torch.Tensor],
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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path = self.paths[index]
        try:
            image = open_pixels(path, min_size=self.min_size)
        except UnreadableImageError as exc:
            # fetch only accepts readable images, so the file changed since then.
            raise UnreadableImageError(
                path, f"{exc.reason} (it was readable when fetched; re-run the fetch stage)"
            ) from None
        label = -1 if self.labels is None else self.labels[index]
        if seed is None:
            return self.transform(image), label, index
        with seeded_rngs(seed):
            return self.transform(image), label, index


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed the CPU RNGs a transform may draw from (torch, NumPy, `random`).

    In the main process (num_workers 0) their states are put back afterwards. A loader
    worker's RNGs serve nobody else, so it skips that: saving and restoring NumPy's
    state was most of the 77 µs per image this took in the workers (7 µs without).
    """
    saved = None
    if get_worker_info() is None:
        saved = torch.get_rng_state(), np.random.get_state(), random.getstate()
    # The CPU generator only: torch.manual_seed would also reseed CUDA's.
    torch.default_generator.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    try:
        yield
    finally:
        if saved is not None:
            torch.set_rng_state(saved[0])
            np.random.set_state(saved[1])
            random.setstate(saved[2])


class PerImageSeeds(Sampler[tuple[int, int]]):
    """Each index of `sampler`, paired with a seed of its own for the image's augmentation.

    The seed depends on `seed`, on how many times this sampler was iterated before (the
    pass over the data) and on the index, and on nothing else. So an image gets the same
    augmentation whichever worker decodes it, with any `num_workers`, and under torchrun
    in whichever process takes it. A DataLoader draws per-worker seeds instead, which
    made the augmentation of a batch depend on which worker drew it.
    `skip` drops the first indices of the first pass without decoding them (a resumed
    epoch starts where it stopped).
    """

    def __init__(self, sampler: Sampler[int], seed: int, skip: int = 0) -> None:
        self.sampler = sampler
        self.seed = seed
        self.skip = skip
        self.passes = 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        pass_index, skip = self.passes, self.skip if self.passes == 0 else 0
        self.passes += 1
        for position, index in enumerate(self.sampler):
            if position >= skip:
                yield index, image_seed(self.seed, pass_index, index)

    def __len__(self) -> int:
        return len(self.sampler) - (self.skip if self.passes == 0 else 0)  # type: ignore[arg-type]


def image_seed(seed: int, pass_index: int, index: int) -> int:
    """A 63-bit seed for one image in one pass, well mixed from the three (NumPy
    SeedSequence); 63 bits, so that it fits an int64 tensor."""
    high, low = np.random.SeedSequence((seed, pass_index, index)).generate_state(2, np.uint32)
    return (int(high) >> 1) << 32 | int(low)


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
    per_image_seeds: bool = False,
    skip: int = 0,
) -> DataLoader:
    """A DataLoader with the runtime's workers and pinning, reproducible for a given seed.

    A `sampler` (e.g. a DistributedSampler) replaces `shuffle`. `per_image_seeds` seeds
    each image's augmentation from (`seed`, pass, index) (`PerImageSeeds`; the dataset
    must take `(index, seed)` keys, as ImageDataset does), and `skip` then drops the first
    images of the first pass. With `runtime.idle_workers` the workers run at idle CPU
    priority (see `resolve_runtime`).
    """
    generator = torch.Generator()
    generator.manual_seed(seed)
    if per_image_seeds:
        if sampler is None:
            sampler = (
                RandomSampler(dataset, generator=generator)  # type: ignore[arg-type]
                if shuffle
                else SequentialSampler(dataset)  # type: ignore[arg-type]
            )
        sampler = PerImageSeeds(sampler, seed, skip)
    elif skip:
        raise ValueError("skip needs per_image_seeds")
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
