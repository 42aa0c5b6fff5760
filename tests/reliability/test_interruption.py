"""Killing `finetune` mid-run (SIGKILL) under a real `dvc repro`: the rerun resumes from the
persisted checkpoint, ends on the uninterrupted run's LR schedule, and DVC never accepts a
half-written output. SIGTERM, which checkpoints before it exits, is the harder case for the
resume and is run on two ranks (tests/model/test_distributed_stages.py)."""

from __future__ import annotations

import importlib.util
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import psutil
import pytest
import torch
import yaml
from project_copy import dvc, make_project, project_env, stage_argv

# Real dogscats photos, tiny: 16 train images per class at 64 px, batch 4 → 8 steps per
# epoch, two 1-epoch SGDR cycles: the kill lands in epoch 2, after the epoch-1 checkpoint.
OVERRIDES = {
    "runtime": {"num_workers": 0},
    "data": {"max_per_class": 16},
    "model": {"image_size": 64},
    "head": {"epochs": 2},
    "lr_find": {"num_iter": 5, "batch_size": 4},
    "finetune": {"n_cycles": 2, "cycle_len": 1, "cycle_mult": 1, "batch_size": 4},
    "tracking": {"enabled": False},
}
CHECKPOINT = Path("outputs/finetune/checkpoints/last.pt")
LR_COLUMNS = ["lr_group0", "lr_group1", "lr_group2"]


def test_the_checkpoints_are_no_dvc_output_and_never_committed(repo_root: Path) -> None:
    # DVC leaves an undeclared folder alone, so a killed run resumes; a declared one (even
    # `persist: true, cache: false`) is missing from every fresh clone and experiment copy,
    # and DVC then re-ran the whole fine-tune there.
    stage = yaml.safe_load((repo_root / "dvc.yaml").read_text())["stages"]["finetune"]
    outs = [next(iter(out)) if isinstance(out, dict) else out for out in stage["outs"]]
    assert not [out for out in outs if "checkpoints" in out]
    ignored = subprocess.run(["git", "check-ignore", "-q", str(CHECKPOINT)], cwd=repo_root)
    assert ignored.returncode == 0


def _finetune_process(dvc_proc: subprocess.Popen, timeout: float = 120) -> psutil.Process:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for child in psutil.Process(dvc_proc.pid).children(recursive=True):
            try:
                command = child.cmdline()
                if command and "python" in command[0] and "stages/finetune.py" in command:
                    return child
            except psutil.NoSuchProcess:
                continue
        assert dvc_proc.poll() is None, "dvc exited before finetune started"
        time.sleep(0.1)
    raise AssertionError("finetune never started")


def _kill_after_first_checkpoint(project: Path, signum: int) -> tuple[str, int]:
    """`dvc repro -f -s finetune`, killed right after the epoch-1 checkpoint appears."""
    (project / CHECKPOINT).unlink(missing_ok=True)
    command = [str(Path(sys.executable).parent / "dvc"), "repro", "-f", "-s", "finetune"]
    proc = subprocess.Popen(
        command, cwd=project, env=project_env(), stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    stage = _finetune_process(proc)
    deadline = time.monotonic() + 120
    while not (project / CHECKPOINT).is_file():
        assert time.monotonic() < deadline and proc.poll() is None, "no checkpoint written"
        time.sleep(0.02)
    time.sleep(0.3)  # into the second epoch
    stage.send_signal(signum)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, output
    return output, stage.pid


def _no_temp_files(project: Path) -> None:
    leftovers = [p for p in (project / "outputs").rglob("*") if p.name.endswith(".tmp")]
    leftovers += [p for p in (project / "data").rglob("*") if p.name.endswith(".tmp")]
    assert not leftovers, leftovers


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, dogscats: Path) -> tuple[Path, dict]:
    """A project run once, uninterrupted, up to finetune; its steps.csv is the reference.

    The stages before finetune run in this process, as their scripts' `main`, and `dvc
    commit` records them: six stage processes' imports saved. finetune, the stage under
    test, runs under `dvc repro` from the start.
    """
    root = make_project(tmp_path_factory.mktemp("interrupt"), OVERRIDES)
    upstream = ("source_stamp", "fetch", "split", "precompute", "train_head", "lr_find")
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.chdir(root)
        for name in upstream:
            spec = importlib.util.spec_from_file_location(name, root / "stages" / f"{name}.py")
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            assert module.main(stage_argv(name, root)) == 0, name
    dvc(root, "commit", "-f", *upstream)
    repro = dvc(root, "repro", "finetune").stdout
    assert "Running stage 'lr_find'" not in repro  # the commit recorded the stages before
    return root, {"steps": pd.read_csv(root / "outputs/finetune/steps.csv")}


@pytest.mark.slow
def test_sigkilled_finetune_resumes_under_dvc_repro(project) -> None:
    root, reference = project
    steps_per_epoch = int((reference["steps"]["epoch"] == 0).sum())
    _kill_after_first_checkpoint(root, signal.SIGKILL)
    # DVC removed the stage's cached outputs before running it; the kill left nothing it
    # would accept: finetune is reported changed and its model file is absent.
    assert not (root / "outputs/finetune/model.safetensors").exists()
    status = dvc(root, "status", "finetune").stdout
    assert "finetune" in status and "changed" in status, status
    _no_temp_files(root)
    saved = torch.load(root / CHECKPOINT, map_location="cpu", weights_only=True)
    step = saved["progress"]["step"]
    assert saved["phase"] == "finetune" and saved["param_groups"]
    recorded = {"model", "optimizer", "schedule", "progress", "param_groups", "rng", "config"}
    assert recorded <= set(saved), set(saved)
    total = len(reference["steps"])
    assert steps_per_epoch <= step < total, (step, total)
    assert step % steps_per_epoch == 0  # only the epoch-end checkpoint survives a SIGKILL

    rerun = dvc(root, "repro", "finetune")
    assert f"resuming from {CHECKPOINT} at step {step}" in rerun.stdout + rerun.stderr
    metrics = json.loads((root / "outputs/finetune/metrics.json").read_text())
    assert metrics["resumed_from_step"] == step
    steps = pd.read_csv(root / "outputs/finetune/steps.csv")
    expected = reference["steps"]
    assert list(steps["step"]) == list(expected["step"])
    pd.testing.assert_frame_equal(steps[LR_COLUMNS], expected[LR_COLUMNS], rtol=0, atol=0)
    # Same data order and RNG after the resume: the losses match the uninterrupted run.
    pd.testing.assert_series_equal(steps["loss"], expected["loss"], rtol=1e-4)
    # Finished and recorded: the checkpoint is gone (a code change must retrain) and DVC
    # accepts the empty persisted folder.
    assert not (root / CHECKPOINT).exists() and (root / CHECKPOINT).parent.is_dir()
    assert "Data and pipelines are up to date" in dvc(root, "status", "finetune").stdout
    _no_temp_files(root)


KILL_MID_WRITE = """
import sys, torch
from pathlib import Path
from visiontune.train.checkpoint import save_checkpoint
save_checkpoint(Path(sys.argv[1]), {"step": 2, "w": torch.ones(40_000_000)})
"""


def test_sigkill_mid_checkpoint_write_keeps_the_last_one_and_leaves_no_temp(
    tmp_path: Path,
) -> None:
    """A real SIGKILL while torch.save is writing (160 MB): the previous checkpoint stays
    loadable, and the next save sweeps the orphaned temp file from the persisted folder."""
    from visiontune.train.checkpoint import load_checkpoint, save_checkpoint

    path = tmp_path / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 1, "w": torch.zeros(3)})
    proc = subprocess.Popen([sys.executable, "-c", KILL_MID_WRITE, str(path)])
    deadline = time.monotonic() + 60
    while not any(p.stat().st_size > 1 << 20 for p in path.parent.glob(".last.pt.*.tmp")):
        assert proc.poll() is None, "the write finished before the kill"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.kill()
    proc.wait()
    assert [p.name for p in path.parent.glob("*.tmp")], "expected an orphaned temp file"
    assert load_checkpoint(path)["step"] == 1
    save_checkpoint(path, {"step": 3, "w": torch.zeros(3)})
    assert load_checkpoint(path)["step"] == 3
    assert [p.name for p in path.parent.iterdir()] == ["last.pt"]
