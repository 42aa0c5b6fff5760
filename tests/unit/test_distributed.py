"""visiontune.distributed and the training sampler on a real 2-process gloo job (torchrun)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from real_config import default_section

from visiontune.config import DistributedParams
from visiontune.distributed import (
    SINGLE,
    DistContext,
    DistributedSetupError,
    init_from_environ,
    shard,
)

WORKER = Path(__file__).with_name("dist_worker.py")


def test_a_plain_launch_is_a_single_process() -> None:
    ctx = init_from_environ(default_section(DistributedParams), "cpu", {})
    assert ctx is SINGLE and ctx.is_main and not ctx.enabled


def test_a_multi_process_launch_with_distributed_disabled_is_refused() -> None:
    with pytest.raises(DistributedSetupError, match=r"distributed\.enabled is false"):
        init_from_environ(
            default_section(DistributedParams, enabled=False), "cpu", {"WORLD_SIZE": "2"}
        )
    with pytest.raises(DistributedSetupError, match="nccl needs CUDA"):
        init_from_environ(
            default_section(DistributedParams, backend="nccl"), "cpu", {"WORLD_SIZE": "2"}
        )


def test_shards_cover_every_row_once_without_padding() -> None:
    frame = pd.DataFrame({"path": [f"{i}.jpg" for i in range(7)]})
    parts = [shard(frame, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert [len(p) for p in parts] == [3, 2, 2]
    assert sorted(path for part in parts for path in part["path"]) == sorted(frame["path"])


def test_collectives_and_sampler_under_torchrun(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command += ["--nproc_per_node=2", str(WORKER), str(tmp_path)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    # Odd count: rank 0 holds rows 0,2,4,6 and rank 1 rows 1,3,5; gathered back in order.
    assert ranks[0]["mine"] == [0, 2, 4, 6] and ranks[1]["mine"] == [1, 3, 5]
    for report in ranks:
        assert report["gathered_in_order"]
        assert report["any_when_rank1"] is True and report["any_when_none"] is False
        assert report["mean_of_ranks"] == 0.5
        assert report["drift_detected"]
        # A global batch of 2 ranks holds exactly the images of the single-process batch,
        # each with the same augmentation seed.
        assert report["global_epoch1"] == report["single_epoch1"]
        assert len(report["global_epoch1"]) == 13 // 4
        assert all(len(batch) == 4 for batch in report["global_epoch1"])
        assert report["global_epoch2"] != report["global_epoch1"]  # reshuffled per epoch
