"""The GPU check (bench/gpu_check.py, `make gpu-check`): its whole run on the CPU without
what a lent GPU machine lacks, its one-line refusal without CUDA, and its helpers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import gpu_prepare  # noqa: E402

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
def test_the_dry_run_runs_the_stages_on_the_cpu_without_what_the_gpu_machine_lacks(
    subset: Path, tmp_path: Path
) -> None:
    args = ["--dry-run-cpu", "--data", str(subset), "--results", str(tmp_path)]
    code = RUN_WITHOUT.format(absent=ABSENT_THERE, script=str(SCRIPT), args=args)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "ok in" in done.stdout.strip().splitlines()[-1]

    record = json.loads((tmp_path / "gpu-dry-run-cpu.json").read_text())
    assert record["ok"] and record["dry_run"] and record["errors"] == {}
    assert record["host"]["jpeg_decoder"] == "pillow"  # TorchCodec absent: Pillow decodes
    assert record["params"]["base"]["device"] == "cpu"
    assert record["limits"]["forward"]["8"]["images_per_s"] > 0
    # The stage scripts themselves ran, from dvc.yaml's commands, each in its process.
    runs = {run["name"]: run for run in record["stages"]}
    assert list(runs) == ["fetch", "split", "precompute", "train_head", "lr_find",
                          "finetune", "evaluate"]  # fmt: skip
    assert all(run["returncode"] == 0 and run["peak_rss_mb"] > 0 for run in runs.values())
    assert "stages/precompute.py --params params.yaml" in runs["precompute"]["command"]
    summary = {row["name"]: row for row in record["summary"]["stages"]}
    assert summary["precompute"]["images"] == 12 + 6 + 12  # and the train photos mirrored
    assert summary["evaluate"]["images"] == 6 * 3  # three views of each valid photo
    # What each stage wrote of its own loader wait, and no GPU memory on a CPU.
    for name in ("precompute", "finetune", "evaluate"):
        assert 0 < summary[name]["data_wait_share"] < 1, name
        assert summary[name]["peak_gpu_mib"] is None, name
    ratios = record["summary"]["ratios"]
    assert ratios["precompute_vs_forward"] > 0 and ratios["finetune_epoch_vs_train_step"] > 0
    assert record["fp16"].startswith("skipped")  # fp16 autocast is a GPU's
    assert record["decode"]["nvjpeg"]["images"] == 6
    assert record["decode"]["nvjpeg_vs_cpu_workers"] > 0
    assert record["collective"] == {"backend": "gloo", "ok": True}


@pytest.mark.parametrize(
    ("args", "says"),
    [([], ["no CUDA device", "--dry-run-cpu"]), (["--dry-run-cpu", "--data", "nowhere"],
                                                  ["no photos at nowhere", "gpu-check-prepare"])],
)  # fmt: skip
def test_without_cuda_or_photos_it_says_so_in_one_line_and_fails(
    args: list[str], says: list[str], tmp_path: Path
) -> None:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}  # no GPU, even on a machine with one
    command = [sys.executable, str(SCRIPT), "--results", str(tmp_path), *args]
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and all(text in lines[0] for text in says), lines
    assert list(tmp_path.iterdir()) == []


def test_each_wheel_is_pinned_by_constraints() -> None:
    """`pip download -c constraints.txt` takes the newest version of a name it does not pin."""
    lines = (BENCH.parent / "constraints.txt").read_text().splitlines()
    pins = [line.split("==")[0].strip() for line in lines if "==" in line]
    pinned = {re.sub(r"[-_.]+", "-", name).lower() for name in pins}
    assert "pydantic-core" in pinned  # spelt pydantic_core there
    assert set(gpu_prepare.WHEELS) <= pinned, set(gpu_prepare.WHEELS) - pinned


def test_the_subset_is_the_same_files_every_time_spread_over_each_class(tmp_path: Path) -> None:
    source = tmp_path / "source"
    for split, count in (("train", 10), ("valid", 4)):
        for label in ("cats", "dogs"):
            folder = source / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                (folder / f"{label}.{i:02d}.jpg").write_bytes(b"x" * (i + 1))
            (folder / "notes.txt").write_text("not a photo")

    def files(root: Path) -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    first = gpu_prepare.copy_subset(source, tmp_path / "a", {"train": 5, "valid": 6})
    second = gpu_prepare.copy_subset(source, tmp_path / "b", {"train": 5, "valid": 6})
    assert first == second == 2 * (1 + 3 + 5 + 7 + 9) + 2 * (1 + 2 + 3 + 4)
    assert files(tmp_path / "a") == files(tmp_path / "b")
    assert len(files(tmp_path / "a")) == 2 * 5 + 2 * 4  # all 4 valid photos: there are no more
    names = sorted(p.name for p in (tmp_path / "a" / "train" / "cats").iterdir())
    assert names == [f"cats.{i:02d}.jpg" for i in (0, 2, 4, 6, 8)]
    # Again into the same folder: what was there before goes.
    assert gpu_prepare.copy_subset(source, tmp_path / "a", {"train": 1, "valid": 1}) == 4
    assert files(tmp_path / "a") == [f"{s}/{c}/{c}.00.jpg" for s in ("train", "valid")
                                     for c in ("cats", "dogs")]  # fmt: skip
