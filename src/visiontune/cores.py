"""The CPU cores this process may use, and the one rule for how many workers to start.

Torch-free: fetch, which decodes in threads, starts without importing torch.
"""

from __future__ import annotations

import os

# More than 8 decoding workers rarely helps: the model, not the decode, is then the limit.
MAX_AUTO_WORKERS = 8


def cpu_count() -> int:
    """CPU cores this process may use (respects affinity masks and cgroups' cpusets)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def loader_workers(num_workers: int | str, share: int = 1) -> int:
    """`runtime.num_workers` as a number; `auto`: this process's share of the cores (`share`
    processes split them, e.g. torchrun's local ranks), from 1 to MAX_AUTO_WORKERS."""
    if num_workers != "auto":
        return int(num_workers)
    return max(1, min(cpu_count() // share, MAX_AUTO_WORKERS))
