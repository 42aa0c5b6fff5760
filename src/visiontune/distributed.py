"""torch.distributed for the heavy stages: `torch_stage` joins torchrun's process group, and
library functions take its `DistContext`, running unchanged in one process (`SINGLE`)."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from visiontune.config import DistributedParams, Params
from visiontune.cores import loader_workers
from visiontune.runtime import Runtime, configure_memory, resolve_runtime, seed_everything

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job; `SINGLE` when not launched by torchrun."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    backend: str | None = None
    # A gloo group for small CPU-side messages (stop flags, sizes): no GPU sync for them.
    control_group: Any = None

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes outputs, checkpoints and logs."""
        return self.rank == 0


SINGLE = DistContext()


class DistributedSetupError(ValueError):
    """A multi-process launch these params cannot serve (the message says why)."""


def resolve_backend(backend: str, device_type: str) -> str:
    """`auto`: nccl for CUDA, gloo for CPU; an explicit backend must suit the device."""
    if backend == "auto":
        return "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl" and device_type != "cuda":
        raise DistributedSetupError(
            "distributed.backend nccl needs CUDA devices; use auto or gloo on CPU"
        )
    return backend


def init_from_environ(
    section: DistributedParams, device_type: str, environ: Mapping[str, str]
) -> DistContext:
    """Join torchrun's process group when `environ` (the stage passes os.environ) says this
    is one of several ranks; `SINGLE` for a plain `python stages/x.py`."""
    world_size = int(environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return SINGLE
    if not section.enabled:
        raise DistributedSetupError(
            f"launched with WORLD_SIZE={world_size} but distributed.enabled is false: "
            "set it to true, or run one process"
        )
    backend = resolve_backend(section.backend, device_type)
    rank, local_rank = int(environ.get("RANK", "0")), int(environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=section.timeout_s)
    # torch reads MASTER_ADDR and MASTER_PORT, set by torchrun, from the environment.
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None
    local_world_size = int(environ.get("LOCAL_WORLD_SIZE", str(world_size)))
    return DistContext(rank, world_size, local_rank, local_world_size, backend, control)


@contextlib.contextmanager
def torch_stage(params: Params) -> Iterator[tuple[Runtime, DistContext]]:
    """A torch stage's set-up, written once: allocator (before any tensor), seeds, runtime,
    then torchrun's process group (left on exit); yields this rank's runtime and group. A
    launch these params cannot serve raises ValueError or RuntimeError (the stage exits 2)."""
    configure_memory(params.runtime)
    seed_everything(params.base.seed, params.base.deterministic)
    runtime = resolve_runtime(params.base, params.runtime)
    if params.distributed.sync_bn and runtime.device.type != "cuda":
        raise ValueError(
            "distributed.sync_bn needs CUDA devices (torch's SyncBatchNorm has no CPU path); "
            "set it to false on CPU"
        )
    ctx = init_from_environ(params.distributed, runtime.device.type, os.environ)
    try:
        yield rank_runtime(runtime, ctx, params.runtime.num_workers == "auto"), ctx
    finally:
        cleanup(ctx)


def cleanup(ctx: DistContext) -> None:
    """Leave the process group (a no-op for a single process)."""
    if ctx.enabled and dist.is_initialized():
        dist.destroy_process_group()


def rank_runtime(runtime: Runtime, ctx: DistContext, auto_workers: bool) -> Runtime:
    """This rank's runtime: its own GPU, and `auto` loader workers shared among local ranks."""
    if not ctx.enabled:
        return runtime
    device = runtime.device
    if device.type == "cuda":
        device = torch.device("cuda", ctx.local_rank)
    workers = loader_workers("auto", ctx.local_world_size) if auto_workers else runtime.num_workers
    return dataclasses.replace(runtime, device=device, num_workers=workers)


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op for a single process)."""
    if ctx.enabled:
        dist.barrier(group=ctx.control_group)


def all_reduce_max(value: float, ctx: DistContext) -> float:
    if not ctx.enabled:
        return value
    tensor = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=ctx.control_group)
    return float(tensor.item())


def any_rank(flag: bool, ctx: DistContext) -> bool:
    """True on every rank when `flag` is true on any (e.g. a stop request seen by one)."""
    return all_reduce_max(float(flag), ctx) > 0


def _device(ctx: DistContext) -> torch.device:
    return torch.device("cuda", ctx.local_rank) if ctx.backend == "nccl" else torch.device("cpu")


def all_reduce_mean(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Mean of `tensor` over the ranks (a new tensor, on the tensor's device)."""
    if not ctx.enabled:
        return tensor
    value = tensor.detach().to(_device(ctx), dtype=torch.float64).clone()
    dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return (value / ctx.world_size).to(tensor.device, dtype=tensor.dtype)


def all_gather_varlen(tensor: torch.Tensor, ctx: DistContext) -> list[torch.Tensor]:
    """Every rank's `tensor` (lengths along dim 0 may differ; other dims must match), on CPU."""
    if not ctx.enabled:
        return [tensor.cpu()]
    length = torch.tensor([tensor.shape[0]])
    lengths = [torch.zeros_like(length) for _ in range(ctx.world_size)]
    dist.all_gather(lengths, length, group=ctx.control_group)
    sizes = [int(n.item()) for n in lengths]
    device = _device(ctx)
    padded = torch.zeros((max(sizes), *tensor.shape[1:]), dtype=tensor.dtype, device=device)
    padded[: tensor.shape[0]] = tensor.to(device)
    parts = [torch.empty_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return [part[:size].cpu() for part, size in zip(parts, sizes, strict=True)]


def shard(items: Sequence[T], ctx: DistContext) -> Sequence[T]:
    """This rank's items (a DataFrame's rows): every world_size-th from its rank on, with no
    padding and no duplicates."""
    rows = getattr(items, "iloc", items)
    return rows[ctx.rank :: ctx.world_size]


def gather_shards(local: torch.Tensor, total: int, ctx: DistContext) -> torch.Tensor:
    """Undo `shard`: all ranks' rows back in the original order (row i from rank i % world)."""
    if not ctx.enabled:
        return local.cpu()
    parts = all_gather_varlen(local, ctx)
    if sum(len(part) for part in parts) != total:
        raise RuntimeError(f"gathered {sum(len(p) for p in parts)} rows, expected {total}")
    full = torch.empty((total, *local.shape[1:]), dtype=local.dtype)
    for rank, part in enumerate(parts):
        full[rank :: ctx.world_size] = part
    return full


def wrap_ddp(model: nn.Module, ctx: DistContext, runtime: Runtime, sync_bn: bool) -> nn.Module:
    """DistributedDataParallel around `model` (as is for a single process); `sync_bn` (CUDA
    only, `torch_stage` checks it) takes BatchNorm statistics from the global batch."""
    if not ctx.enabled:
        return model
    if sync_bn:
        nn.SyncBatchNorm.convert_sync_batchnorm(model)
    device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    # No unused-parameter search (the default): frozen BN keeps its affine weights trainable.
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def check_in_sync(model: nn.Module, ctx: DistContext) -> None:
    """Raise if the ranks' parameters differ (DDP keeps them bit-identical)."""
    if not ctx.enabled:
        return
    with torch.no_grad():
        sums = torch.stack([p.detach().double().sum() for p in model.parameters()])
    parts = all_gather_varlen(sums.cpu(), ctx)
    for rank, part in enumerate(parts[1:], start=1):
        if not torch.equal(part, parts[0]):
            raise RuntimeError(f"rank {rank}'s parameters differ from rank 0's after training")
