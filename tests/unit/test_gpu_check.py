"""The GPU check (bench/gpu_check.py, `make gpu-check`): its whole run on the CPU without
what a lent GPU machine lacks, its one-line refusal without CUDA, and its helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_prepare  # noqa: E402
import gpu_probes  # noqa: E402

SCRIPT = BENCH / "gpu_check.py"
# Installed here, absent on the lent machine (it has torch, timm, pandas, scikit-learn, ...;
# pydantic and the weights travel as wheels): the dry run must get by without them.
ABSENT_THERE = ("mlflow", "dvc", "torchcodec", "matplotlib", "requests")
RUN_WITHOUT = """
import importlib.abc, runpy, sys

class Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {absent!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None

sys.meta_path.insert(0, Absent())
sys.argv = [{script!r}, *{args!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.fixture(scope="module")
def subset(dogscats: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What `make gpu-check-prepare` copies, shrunk: 6 train and 3 valid photos per class."""
    root = tmp_path_factory.mktemp("gpu") / "data" / "dogscats"
    gpu_prepare.copy_subset(dogscats, root, {"train": 6, "valid": 3})
    return root


@pytest.mark.slow
def test_the_dry_run_runs_every_section_on_the_cpu_without_what_the_gpu_machine_lacks(
    subset: Path, tmp_path: Path
) -> None:
    args = ["--dry-run-cpu", "--data", str(subset), "--results", str(tmp_path)]
    code = RUN_WITHOUT.format(absent=ABSENT_THERE, script=str(SCRIPT), args=args)
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    seconds = time.monotonic() - start
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert seconds < 180
    assert "ok in" in done.stdout.strip().splitlines()[-1]

    record = json.loads((tmp_path / "gpu-dry-run-cpu.json").read_text())
    assert record["ok"] and record["dry_run"] and record["errors"] == {}
    assert set(record["skipped"]) == {"finetune_fp16"}  # fp16 autocast is a GPU's
    assert record["host"]["jpeg_decoder"] == "pillow"  # TorchCodec absent: Pillow decodes
    assert record["subset"] == {
        "root": "dogscats",
        "train": 12,
        "valid": 6,
        "classes": ["cats", "dogs"],
    }
    assert record["params"]["base"]["device"] == "cpu"
    assert record["limits"]["forward"]["8"]["images_per_s"] > 0
    assert record["limits"]["train_step"]["images_per_s"] > 0

    stages = record["stages"]
    assert set(stages) == {"precompute", "train_head", "lr_find", "finetune", "evaluate"}
    assert stages["precompute"]["images"] == 18 + 12  # and the 12 train images mirrored
    assert stages["train_head"]["n_train"] == 12
    assert stages["lr_find"]["iterations"] <= 5 and stages["lr_find"]["lr"] > 0
    assert stages["finetune"]["lr"] == stages["lr_find"]["lr"]  # finetune.lr: auto
    assert len(stages["finetune"]["history"]) == 1 and stages["finetune"]["steps"] == 3
    assert stages["finetune"]["grad_scaler_scale"] is None  # fp32: no GradScaler
    assert stages["evaluate"]["n_images"] == 6 and stages["evaluate"]["n_views"] == 3
    for name in ("precompute", "lr_find", "finetune", "evaluate"):
        stage = stages[name]
        assert stage["wall_s"] > 0 and stage["peak_gpu_allocated_mib"] is None
        wait = stage["data_wait"]
        assert 0 <= wait["wait_share"] <= 1 and wait["passes"], name
        assert all(p["batches"] > 0 and p["seconds"] > 0 for p in wait["passes"]), name
    assert len(stages["finetune"]["data_wait"]["passes"]) == 1  # one loader per epoch

    assert set(record["ratios"]) == {
        "precompute_vs_forward",
        "finetune_epoch_vs_train_step",
        "evaluate_vs_forward",
        "train_head_vs_finetune_epoch",
    }
    assert all(value > 0 for value in record["ratios"].values())

    decode = record["decode"]
    assert decode["images"] == 18 and decode["decode_jpeg"]["device"] == "cpu"
    for part in ("decode", "eval_transform"):
        assert decode["cpu_workers"][part]["images_per_s"] > 0
        assert decode["decode_jpeg"][part]["images_per_s"] > 0
        assert decode["decode_jpeg_vs_cpu_workers"][part] > 0
    assert record["collective"]["backend"] == "gloo" and record["collective"]["ok"]
    assert 0 < record["wall_s"] < seconds


def test_without_cuda_it_says_so_in_one_line_and_fails(tmp_path: Path) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine with one
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0] and "--dry-run-cpu" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_the_wheels_are_pinned_by_constraints() -> None:
    pins = gpu_prepare.pinned_versions(BENCH.parent / "constraints.txt")
    assert [pin.split("==")[0] for pin in pins] == list(gpu_prepare.WHEELS)
    assert all(pin.split("==")[1] for pin in pins)
    with pytest.raises(ValueError, match=r"no_such\.package"):
        gpu_prepare.pinned_versions(BENCH.parent / "constraints.txt", ("no_such.package",))


def test_the_subset_is_the_same_files_every_time_spread_over_each_class(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for split, count in (("train", 10), ("valid", 4)):
        for label in ("cats", "dogs"):
            folder = source / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{label}.{i:02d}.jpg").write_bytes(b"x" * (i + 1))
            (folder / "notes.txt").write_text("not a photo")
    first = gpu_prepare.copy_subset(source, tmp_path / "a", {"train": 5, "valid": 4})
    second = gpu_prepare.copy_subset(source, tmp_path / "b", {"train": 5, "valid": 4})
    assert first == second
    assert first["images"] == {"train": {"cats": 5, "dogs": 5}, "valid": {"cats": 4, "dogs": 4}}
    names = sorted(p.name for p in (tmp_path / "a" / "train" / "cats").iterdir())
    assert names == [f"cats.{i:02d}.jpg" for i in (0, 2, 4, 6, 8)]
    assert first["bytes"] == 2 * (1 + 3 + 5 + 7 + 9) + 2 * (1 + 2 + 3 + 4)
    assert json.loads((tmp_path / "a" / "subset.json").read_text()) == first


def test_timed_loaders_record_each_pass_and_leave_the_loader_as_it_was() -> None:
    def create_loader(size: int) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(list(range(size)), batch_size=3)

    module = types.SimpleNamespace(create_loader=create_loader)
    with gpu_probes.timed_loaders(module) as passes:
        loader = module.create_loader(10)
        assert loader.batch_size == 3 and len(loader) == 4 and len(loader.dataset) == 10
        batches = [batch.tolist() for batch in loader]
        iterator = iter(loader)
        next(iterator)  # a pass its caller stops early, as the fine-tune loop does
    assert module.create_loader is create_loader
    assert batches == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9]]
    assert [len(p.waits) for p in passes] == [4, 1]
    assert passes[0].ended is not None and passes[1].ended is None
    summary = gpu_probes.wait_share(passes, seconds=[1.0, 1.0])
    assert summary["seconds"] == 2.0 and 0 <= summary["wait_share"] < 1
    assert summary["wait_s"] == pytest.approx(sum(passes[0].waits) + sum(passes[1].waits))


def test_device_names_become_file_names() -> None:
    assert gpu_probes.slug("NVIDIA H200") == "nvidia-h200"
    assert gpu_probes.slug("NVIDIA A100-SXM4-80GB") == "nvidia-a100-sxm4-80gb"
