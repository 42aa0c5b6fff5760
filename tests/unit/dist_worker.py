"""Run by test_distributed.py under a real `torchrun --nproc_per_node=2` (gloo, CPU).

Each rank writes what it observed to OUT/rank<N>.json; the test compares the ranks.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from torch import nn

from visiontune.config import DistributedParams
from visiontune.distributed import (
    SINGLE,
    all_gather_varlen,
    all_reduce_mean,
    any_rank,
    check_in_sync,
    cleanup,
    gather_shards,
    init_from_environ,
    shard,
)
from visiontune.runtime import create_runtime
from visiontune.train.epoch import epoch_loader


class Indices(torch.utils.data.Dataset):
    """Items in the (image, label, index) shape of ImageDataset: the "image" is the
    augmentation seed the loader gave the item (its key is an (index, seed) pair)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        return torch.tensor([seed]), 0, index


def global_batches(dataset, batch_size: int, epoch: int, ctx, runtime) -> list[list[list[int]]]:
    """Each global batch as sorted [index, augmentation seed] pairs."""
    loader = epoch_loader(dataset, batch_size, runtime, 3, epoch, ctx)
    local = torch.stack([torch.stack([index, seed[:, 0]], 1) for seed, _, index in loader])
    parts = all_gather_varlen(local, ctx)
    return [sorted(torch.cat([part[k] for part in parts]).tolist()) for k in range(len(local))]


def main(out: Path) -> None:
    # Spelled out: a torchrun script outside pytest, so no tests/real_config here.
    settings = DistributedParams(
        enabled=True, backend="gloo", sync_bn=False, timeout_s=1800.0, launcher="torchrun"
    )
    ctx = init_from_environ(settings, "cpu", os.environ)
    runtime = create_runtime(device="cpu", precision="fp32")
    n = 7  # odd: the ranks hold 4 and 3 rows
    rows = torch.arange(n * 3, dtype=torch.float64).view(n, 3)
    mine = list(shard(list(range(n)), ctx))
    report = {
        "rank": ctx.rank,
        "world_size": ctx.world_size,
        "mine": mine,
        "gathered_in_order": torch.equal(gather_shards(rows[mine], n, ctx), rows),
        "any_when_rank1": any_rank(ctx.rank == 1, ctx),
        "any_when_none": any_rank(False, ctx),
        "mean_of_ranks": all_reduce_mean(torch.tensor([float(ctx.rank)]), ctx).item(),
    }
    dataset = Indices(13)  # 13 images, global batch 4: 3 steps, one image left over
    single = [
        sorted(torch.stack([index, seed[:, 0]], 1).tolist())
        for seed, _, index in epoch_loader(dataset, 4, runtime, 3, 1, SINGLE)
    ]
    report["single_epoch1"] = single
    report["global_epoch1"] = global_batches(dataset, 4, 1, ctx, runtime)
    report["global_epoch2"] = global_batches(dataset, 4, 2, ctx, runtime)
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    check_in_sync(model, ctx)  # same seed: in sync
    with torch.no_grad():
        model.bias.add_(float(ctx.rank))
    try:
        check_in_sync(model, ctx)
        report["drift_detected"] = False
    except RuntimeError as exc:
        report["drift_detected"] = "differ" in str(exc)
    cleanup(ctx)
    (out / f"rank{ctx.rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
