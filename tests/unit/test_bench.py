"""The benchmark harness's pure helpers and its per-process measurement (bench/)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

BENCH = Path(__file__).resolve().parents[2] / "bench"
sys.path.insert(0, str(BENCH))

import project  # noqa: E402
import run  # noqa: E402
import summary  # noqa: E402

from visiontune.config import parse_params  # noqa: E402
from visiontune.data.sources import pick_mirror  # noqa: E402
from visiontune.locations import Locator  # noqa: E402


def test_deep_merge_merges_sections_and_replaces_leaves() -> None:
    base = {"data": {"source": "a", "max_per_class": 8}, "head": {"epochs": 8}}
    merged = project.deep_merge(base, {"data": {"max_per_class": None, "labels": "x.csv"}})
    assert merged == {
        "data": {"source": "a", "max_per_class": None, "labels": "x.csv"},
        "head": {"epochs": 8},
    }
    assert base["data"]["max_per_class"] == 8  # the input is not mutated


@pytest.mark.parametrize("name", run.CLASS_COUNTS)
@pytest.mark.parametrize("quick", [False, True])
def test_bench_params_are_valid_params_with_absolute_data_paths(
    name: str, quick: bool, tmp_path: Path
) -> None:
    raw = run.bench_params(name, tmp_path, quick=quick, tracking=False)
    params = parse_params(raw)
    assert Path(params.data.source).is_absolute()
    # A local source: the shipped mirror of the demo URL stays and is not used.
    assert (
        pick_mirror(params.data.source, params.data.mirrors, Locator.for_stage(tmp_path, None))
        is None
    )
    assert params.tracking.enabled is False
    if name == "dogbreeds":
        assert Path(params.data.labels).is_absolute()
        assert params.data.label_column == "breed"


def test_run_measured_reports_this_child_memory_time_and_exit_code(tmp_path: Path) -> None:
    code = "import time; b = bytearray(200 * 2**20); b[::4096] = b'x' * len(b[::4096]); "
    code += "time.sleep(0.3); raise SystemExit(3)"
    result = project.run_measured(
        "alloc", [sys.executable, "-c", code], tmp_path, {}, tmp_path / "alloc.log"
    )
    assert result.returncode == 3
    assert result.wall_s >= 0.3
    assert 200 <= result.peak_rss_mb < 1000


def test_summarize_ratios_against_limits() -> None:
    params = {
        "finetune": {"cycle_len": 1, "cycle_mult": 2, "n_cycles": 2},
        "tta": {"n_augment": 4, "batch_size": 64},
        "precompute": {"batch_size": 64},
        "lr_find": {"batch_size": 32},
    }
    outputs = {
        "train_images": 100,
        "valid_images": 50,
        "prepared_images": 150,
        "lr_find_iterations": 10,
        "metrics": {
            "precompute": {"images": 150, "images_per_s": 90.0, "data_wait_share": 0.25},
            "train_head": {"valid_acc": 0.9},
            "finetune": {"valid_acc": 0.95},
            "evaluate": {
                "accuracy": 0.96,
                "accuracy_tta": 0.97,
                "images_per_s": 12.0,  # images, each seen in n_views views
                "n_views": 5,
            },
        },
        # The loop's own images/s and seconds per epoch: their medians count.
        "finetune_history": [
            {"images_per_s": "10", "seconds": "10"},
            {"images_per_s": "9", "seconds": "11"},
            {"images_per_s": "11", "seconds": "9"},
        ],
    }
    stages = [
        {"name": "precompute", "wall_s": 3.0},
        {"name": "train_head", "wall_s": 0.4},
        {"name": "finetune", "wall_s": 40.0},
        {"name": "evaluate", "wall_s": 5.0},
    ]
    limits = {"forward": {"64": {"images_per_s": 100.0}}, "train_step": {"images_per_s": 12.5}}
    result = summary.summarize(stages, outputs, params, limits)
    ratios = result["ratios"]
    assert ratios["precompute_vs_forward"] == pytest.approx(0.9)  # the stage's own number
    assert ratios["evaluate_vs_forward"] == pytest.approx(12 * 5 / 100)  # per view
    assert ratios["finetune_epoch_vs_train_step"] == pytest.approx(10 / 12.5)
    assert ratios["train_head_vs_finetune_epoch"] == pytest.approx(0.04)
    assert result["targets_met"] == {
        "precompute_vs_forward": True,
        "evaluate_vs_forward": False,
        "finetune_epoch_vs_train_step": False,
        "train_head_vs_finetune_epoch": True,
    }
    rows = {row["name"]: row for row in result["stages"]}
    assert rows["precompute"]["data_wait_share"] == 0.25
    assert rows["precompute"]["peak_gpu_mib"] is None
    assert rows["finetune"]["images"] == 3 * 100  # SGDR cycles of 1 and 2 epochs
    assert result["accuracy"] == {
        "baseline": None,
        "head": 0.9,
        "finetune": 0.95,
        "evaluate": 0.96,
        "evaluate_tta": 0.97,
    }


def test_ratios_use_the_limits_measured_next_to_each_stage() -> None:
    params = {
        "finetune": {"cycle_len": 1, "cycle_mult": 1, "n_cycles": 1},
        "tta": {"n_augment": 0, "batch_size": 32},
        "precompute": {"batch_size": 64},
        "lr_find": {"batch_size": 32},
    }
    outputs = {
        "train_images": 100,
        "valid_images": 50,
        "prepared_images": 150,
        "lr_find_iterations": 0,
        "metrics": {
            "precompute": {"images": 150, "images_per_s": 80.0},
            "train_head": {},
            "finetune": {},
            "evaluate": {"images_per_s": 70.0, "n_views": 1},
        },
        "finetune_history": [{"images_per_s": "10", "seconds": "10"}],
    }
    stages = [
        {"name": n, "wall_s": 10.0, "cpu_s": 15.0, "peak_rss_mb": 900.0}
        for n in ("precompute", "finetune", "evaluate")
    ]
    limits = {
        "forward": {"32": {"images_per_s": 120.0}, "64": {"images_per_s": 125.0}},
        "train_step": {"images_per_s": 20.0},
        "adjacent": {  # the host slowed down after the start-of-run limits
            "precompute": {"before": {"images_per_s": 90.0}, "after": {"images_per_s": 110.0}},
            "finetune": {"after": {"images_per_s": 12.5}},  # e.g. "before" failed
        },
    }
    result = summary.summarize(stages, outputs, params, limits)
    used = result["limits_used"]
    assert used == {"precompute": 100.0, "finetune": 12.5, "evaluate": 120.0}
    ratios = result["ratios"]
    assert ratios["precompute_vs_forward"] == pytest.approx(0.8)
    assert ratios["finetune_epoch_vs_train_step"] == pytest.approx(10 / 12.5)
    assert ratios["evaluate_vs_forward"] == pytest.approx(70 / 120)
    record = {
        "started": "now",
        "git": {"commit": "abc", "dirty": False},
        "load_before": [0.1],
        "quick": False,
        "summary": result,
        "limits": {
            **limits,
            "backbone": "b",
            "image_size": 224,
            "precision": "bf16",
            "channels_last": True,
            "torch_threads": 2,
            "cpu": "AVX512",
            "train_step": {"batch_size": 32, "images_per_s": 20.0},
            "decode": {},
        },
    }
    table = summary.markdown("x", record)
    assert "forward at 32 120.0 img/s, forward at 64 125.0 img/s, train step 20.0 img/s" in table
    assert "| precompute_vs_forward | 0.800 | 100.0 | ≥ 0.85 |" in table
    assert "| evaluate_vs_forward | 0.583 | 120.0 | ≥ 0.85 |" in table
    assert "| train_head_vs_finetune_epoch | – | – | < 0.05 |" in table


def test_run_measured_does_not_charge_the_parents_memory_to_the_stage(tmp_path: Path) -> None:
    # Linux carries ru_maxrss across fork + exec: spawned straight from a big benchmark
    # process, a tiny stage would report the benchmark's RSS.
    ballast = bytearray(256 * 2**20)
    ballast[::4096] = b"x" * len(ballast[::4096])
    result = project.run_measured(
        "tiny", [sys.executable, "-c", "pass"], tmp_path, {}, tmp_path / "tiny.log"
    )
    assert result.returncode == 0
    assert result.peak_rss_mb < 128
    del ballast


def test_stage_commands_are_resolved_like_dvc_templating(tmp_path: Path) -> None:
    repo = BENCH.parent
    commands = {name: cmd for name, cmd, _ in project.pipeline_stages(repo)}
    assert all("${" not in cmd for cmd in commands.values())
    assert commands["finetune"].startswith("python stages/finetune.py --params params.yaml")
    launcher = {"distributed": {"launcher": "torchrun --standalone --nproc_per_node=2"}}
    assert "${distributed.launcher} stages/finetune.py" in (repo / "dvc.yaml").read_text()
    project_dir = tmp_path / "p"
    project_dir.mkdir()
    a = "a: {cmd: '${distributed.launcher} stages/x.py'}"
    (project_dir / "dvc.yaml").write_text(
        f"stages:\n  {a}\n  b: {{cmd: '${{distributed.nope}}'}}\n"
    )
    (project_dir / "params.yaml").write_text(yaml.safe_dump(launcher))
    with pytest.raises(KeyError, match=r"distributed\.nope"):
        project.pipeline_stages(project_dir)
    (project_dir / "dvc.yaml").write_text(
        "stages:\n  a: {cmd: '${distributed.launcher} stages/x.py'}\n"
    )
    [(_, command, _)] = project.pipeline_stages(project_dir)
    assert command == "torchrun --standalone --nproc_per_node=2 stages/x.py"


def test_git_state_ignores_earlier_results_but_not_other_changes(tmp_path: Path) -> None:
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@localhost"]
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "dogscats.md").write_text("old\n")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    assert project.git_state(tmp_path)["dirty"] is False
    (tmp_path / "bench" / "results" / "dogscats.md").write_text("new\n")
    (tmp_path / "bench" / "results" / "dogbreeds.json").write_text("{}\n")
    assert project.git_state(tmp_path)["dirty"] is False
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert project.git_state(tmp_path)["dirty"] is True


def test_logistic_baseline_scores_a_feature_cache(tmp_path: Path) -> None:
    from baseline import logistic_baseline
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 8, generator=g) * 3
    y = torch.arange(90) % 3
    x = centers[y] + torch.randn(90, 8, generator=g)
    path = tmp_path / "features.safetensors"
    save_file({"train_x": x[:60], "train_y": y[:60], "valid_x": x[60:], "valid_y": y[60:]}, path)
    result = logistic_baseline(path)
    assert result["accuracy"] > 0.9 and 0 < result["loss"] < 0.5 and result["C"] > 0


def test_a_stage_that_wrote_nothing_gets_no_numbers_made_up() -> None:
    params = {
        "finetune": {"cycle_len": 1, "cycle_mult": 1, "n_cycles": 1},
        "tta": {"n_augment": 1, "batch_size": 32},
        "precompute": {"batch_size": 32},
        "lr_find": {"batch_size": 32},
    }
    outputs = {  # evaluate failed: its metrics.json was never written
        "train_images": 100, "valid_images": 50, "prepared_images": 150,
        "lr_find_iterations": 0, "finetune_history": [],
        "metrics": {"precompute": {"images": 150, "images_per_s": 80.0}, "train_head": {},
                    "finetune": {}, "evaluate": {}},
    }  # fmt: skip
    limits = {"forward": {"32": {"images_per_s": 100.0}}, "train_step": {"images_per_s": 20.0}}
    stages = [{"name": "evaluate", "wall_s": 2.0}]
    result = summary.summarize(stages, outputs, params, limits)
    (row,) = result["stages"]
    assert row["images"] is None and row["images_per_s_reported"] is None
    assert result["ratios"]["evaluate_vs_forward"] is None
    assert result["targets_met"]["evaluate_vs_forward"] is None
