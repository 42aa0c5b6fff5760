"""Disk and memory: a full disk mid-write keeps the previous output and leaves no temp files;
fetch + precompute (DataLoader workers included) on 2 photos of each of 120 breeds stay
within a bounded RSS."""

from __future__ import annotations

import errno
import json
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml

from visiontune.fileio import atomic_dir, atomic_open, write_csv, write_json
from visiontune.train.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[2]
RSS_LIMIT = 3 * 2**30


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 64 KiB tmpfs: writes past it fail with ENOSPC (needs root to mount)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def _temp_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.endswith((".tmp", ".old"))]


def test_full_disk_keeps_the_previous_json_csv_and_checkpoint(full_disk: Path) -> None:
    write_json(full_disk / "metrics.json", {"valid_acc": 0.9})
    write_csv(full_disk / "history.csv", pd.DataFrame({"epoch": [0], "loss": [1.0]}))
    save_checkpoint(full_disk / "last.pt", {"step": 3, "w": torch.ones(4)})
    before = {p.name: p.read_bytes() for p in full_disk.iterdir()}

    big = "x" * 200_000  # three times the disk
    with pytest.raises(OSError) as failure:
        write_json(full_disk / "metrics.json", {"valid_acc": 0.1, "junk": big})
    assert failure.value.errno == errno.ENOSPC
    with pytest.raises(OSError, match="No space left"):
        write_csv(full_disk / "history.csv", pd.DataFrame({"epoch": range(20_000)}))
    with pytest.raises((OSError, RuntimeError)):  # torch.save reports ENOSPC its own way
        save_checkpoint(full_disk / "last.pt", {"step": 4, "w": torch.ones(50_000)})

    assert {p.name: p.read_bytes() for p in full_disk.iterdir()} == before
    assert load_checkpoint(full_disk / "last.pt")["step"] == 3
    assert not _temp_files(full_disk)


def test_full_disk_keeps_the_previous_output_folder(full_disk: Path) -> None:
    with atomic_dir(full_disk / "split") as tmp:
        (tmp / "train.csv").write_text("path,label\na.jpg,cat\n")
    with pytest.raises(OSError) as failure, atomic_dir(full_disk / "split") as tmp:
        (tmp / "train.csv").write_text("path,label\n")
        (tmp / "valid.csv").write_bytes(b"\0" * 200_000)
    assert failure.value.errno == errno.ENOSPC
    assert [p.name for p in (full_disk / "split").iterdir()] == ["train.csv"]
    assert (full_disk / "split" / "train.csv").read_text() == "path,label\na.jpg,cat\n"
    assert not _temp_files(full_disk)


KILLED_WRITER = """
import sys, time
from pathlib import Path
from visiontune.fileio import atomic_dir, atomic_open
out = Path(sys.argv[1])
with atomic_dir(out / "split") as tmp, atomic_open(out / "metrics.json") as handle:
    (tmp / "train.csv").write_text("path,label\\n" * 1000)
    handle.write("{" * 1000)
    handle.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_sigkilled_write_leaves_orphans_that_the_next_write_removes(tmp_path: Path) -> None:
    """A real SIGKILL mid-write: the old outputs stay, and the next write of the same output
    sweeps the orphaned temp file/folder (DVC cleans neither: they are hidden siblings)."""
    write_json(tmp_path / "metrics.json", {"old": True})
    with atomic_dir(tmp_path / "split") as tmp:
        (tmp / "train.csv").write_text("old\n")
    proc = subprocess.Popen(
        [sys.executable, "-c", KILLED_WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "writing"
    proc.kill()
    proc.wait()
    assert len(_temp_files(tmp_path)) == 2  # the kill orphaned both
    assert json.loads((tmp_path / "metrics.json").read_text()) == {"old": True}
    assert (tmp_path / "split" / "train.csv").read_text() == "old\n"

    write_json(tmp_path / "metrics.json", {"new": True})
    with atomic_dir(tmp_path / "split") as tmp:
        (tmp / "train.csv").write_text("new\n")
    assert not _temp_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "split"]


def test_a_write_failing_midway_keeps_the_old_file(tmp_path: Path) -> None:
    """Without a mountable disk: the sink fails (ENOSPC) after part of the data went out."""
    target = tmp_path / "report.md"
    target.write_text("old report\n")
    with pytest.raises(OSError), atomic_open(target) as handle:
        handle.write("new report, first half\n" * 1000)
        handle.flush()
        raise OSError(errno.ENOSPC, "No space left on device")
    assert target.read_text() == "old report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]


# -- memory ----------------------------------------------------------------------------------

# The real params at the backbone's own input size (224 px), 2 photos of each of 120 breeds:
# the model and the loader workers dominate the memory, not the number of photos.
MEMORY_PARAMS = {
    "runtime": {"num_workers": 2},
    "data": {"labels": "labels.csv", "label_column": "breed", "max_per_class": 2},
    "precompute": {"batch_size": 64},
    "tracking": {"enabled": False},
}  # fmt: skip


def _run_measured(command: list[str], cwd: Path) -> tuple[float, int]:
    """Run a stage; return (seconds, peak summed PSS of it and its DataLoader workers).

    PSS, not RSS: forked workers share the parent's pages (torch, the model) and the
    batches they hand over live in shared memory; summed RSS would count those twice.
    """
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    parent = psutil.Process(process.pid)
    peak = 0
    while process.poll() is None:
        total = 0
        for proc in [parent, *parent.children(recursive=True)]:
            try:
                total += proc.memory_full_info().pss
            except psutil.Error:
                continue
        peak = max(peak, total)
        time.sleep(0.1)
    output = process.stdout.read().decode()
    assert process.returncode == 0, output[-4000:]
    return time.perf_counter() - started, peak


@pytest.mark.slow
def test_fetch_and_precompute_rss_on_120_breeds(dogbreeds: Path, tmp_path: Path) -> None:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in MEMORY_PARAMS.items():
        params[section].update(values)
    params["data"]["source"] = str(dogbreeds)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    python, stages = sys.executable, REPO / "stages"
    p = ["--params", "params.yaml"]
    runs = {
        "fetch": [python, stages / "fetch.py", *p, "--out", "prepared", "--download-dir", "dl"],
        "split": [python, stages / "split.py", *p, "--prepared", "prepared", "--out", "split"],
        "precompute": [python, stages / "precompute.py", *p, "--prepared", "prepared",
                       "--split", "split", "--out", "features"],
    }  # fmt: skip
    measured = {name: _run_measured([str(c) for c in cmd], tmp_path) for name, cmd in runs.items()}
    # ru_maxrss: the largest single process among everything run (and waited for) so far.
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    report = {
        name: {"seconds": round(s, 1), "peak_pss_mib": round(r / 2**20)}
        for name, (s, r) in measured.items()
    }
    report["largest_process_rss_mib"] = round(largest / 2**20)
    print(json.dumps(report))
    manifest = pd.read_csv(tmp_path / "prepared" / "manifest.csv")
    per_breed = pd.read_csv(dogbreeds / "labels.csv")["breed"].value_counts()
    assert len(manifest) == per_breed.clip(upper=2).sum() and manifest["label"].nunique() == 120
    features = tmp_path / "features" / "features.safetensors"
    assert features.stat().st_size > len(manifest) * 1280 * 2
    for name, (_, rss) in measured.items():
        assert rss < RSS_LIMIT, (name, report)
    assert largest < RSS_LIMIT, report
