"""Images on disk → batches: a dataset that decodes only as much JPEG as it needs, and loaders
whose shuffling and augmentation repeat for a seed whatever the number of workers or processes."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler, SequentialSampler

from visiontune.data.images import UnreadableImageError
from visiontune.data.pixels import open_pixels
from visiontune.runtime import Runtime, lower_to_idle_priority, release_freed_memory


class ImageDataset(Dataset):
    """(uint8 3×H×W pixels through `transform`, label or -1, index) for each path.

    `min_size`, the short side the transform needs, lets large JPEGs decode reduced (faster).
    A key is an index or an `(index, seed)` pair from `PerImageSeeds`, which seeds the transform.
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
        with contextlib.nullcontext() if seed is None else seeded_rngs(seed):
            return self.transform(image), label, index


@contextlib.contextmanager
def seeded_rngs(seed: int) -> Iterator[None]:
    """Seed the CPU RNGs a transform may draw from (torch, NumPy, `random`).

    The main process gets their states back afterwards. A loader worker's RNGs serve nobody
    else, so it skips that: saving and restoring (NumPy's mostly) took 77 µs an image, 7 without.
    """
    saved = None
    if torch.utils.data.get_worker_info() is None:
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
    """Each index of `sampler`, paired with a seed for the image's augmentation.

    The seed depends only on `seed`, the pass over the data and the index, so an image is
    augmented alike whichever worker or torchrun process decodes it (a DataLoader's
    per-worker seeds made a batch's augmentation depend on the worker that drew it).
    `skip` drops the first indices of the first pass undecoded (a resumed epoch).
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
    """The three mixed by NumPy's SeedSequence into 63 bits, so that it fits an int64 tensor."""
    high, low = np.random.SeedSequence((seed, pass_index, index)).generate_state(2, np.uint32)
    return (int(high) >> 1) << 32 | int(low)


def _idle_worker(worker_id: int) -> None:
    # torch itself seeds each worker's torch, NumPy and `random` from the loader's generator.
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

    A `sampler` (e.g. a DistributedSampler) replaces `shuffle`. `per_image_seeds` wraps it
    in `PerImageSeeds` (the dataset must take `(index, seed)` keys, as ImageDataset does),
    which `skip` needs. `runtime.idle_workers` runs the workers at idle CPU priority.
    """
    generator = torch.Generator().manual_seed(seed)
    if per_image_seeds:
        if sampler is None and shuffle:
            sampler = RandomSampler(dataset, generator=generator)  # type: ignore[arg-type]
        elif sampler is None:
            sampler = SequentialSampler(dataset)  # type: ignore[arg-type]
        sampler = PerImageSeeds(sampler, seed, skip)
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
        worker_init_fn=_idle_worker if workers > 0 and runtime.idle_workers else None,
    )
