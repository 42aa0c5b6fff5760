"""`make gpu-check`: the pipeline's CUDA path, run and measured once on a lent GPU machine.

precompute → train_head → lr_find → fine-tune → evaluate on the photo subset that
`make gpu-check-prepare` put in `.gpu/data`, with device cuda and precision auto, built
from the library's own functions as the stages call them (no DVC, no tracking). Beside
them, in the same process: the forward and train-step limits (bench/limits.py) and each
stage's ratio to them, the share of each step spent waiting for data, peak GPU memory per
stage, JPEG decoding by CPU workers against nvJPEG, one fp16 epoch (GradScaler: `auto`
picks bf16 on GPUs that have it) and a one-rank NCCL all-reduce. Writes
bench/results/gpu-<device>.json. `--dry-run-cpu` runs all of it, small, on the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
# The library of this checkout, whatever else is installed.
sys.path[:0] = [str(BENCH), str(REPO_ROOT / "src")]

import torch  # noqa: E402
from gpu_stages import Check, run_stages, say, write_split  # noqa: E402

GPU_OVERRIDES: dict[str, Any] = {
    "base": {"device": "cuda", "precision": "auto"},
    # Two 1-epoch SGDR cycles: a restart, and a second epoch whose cuDNN is warm.
    "finetune": {"n_cycles": 2, "cycle_len": 1, "cycle_mult": 1},
    "tracking": {"enabled": False},
}
# On 2 shared cores: tiny images and batches, one epoch, fp32 (the fastest on a CPU); the
# code paths are the GPU run's.
DRY_RUN_OVERRIDES: dict[str, Any] = {
    "base": {"device": "cpu", "precision": "fp32"},
    "runtime": {"num_workers": 1},
    "data": {"max_per_class": 6},
    "model": {"image_size": 32},
    "precompute": {"batch_size": 8},
    "head": {"epochs": 2},
    "lr_find": {"num_iter": 5, "batch_size": 4, "end_lr": 1.0e-2},
    "finetune": {"batch_size": 4, "n_cycles": 1},
    "tta": {"n_augment": 2, "batch_size": 8},
}
REQUIRED_STAGES = ("precompute", "train_head", "lr_find", "finetune", "evaluate")
GPU_TIMING = {"warmup": 3, "repeats": 3, "steps": 20}  # ms per step: more steps than a CPU's
DRY_RUN_TIMING = {"warmup": 1, "repeats": 1, "steps": 1}


def build_params(params_file: Path, dry_run: bool) -> Any:
    """The repo's params with the check's overrides, validated (visiontune.config)."""
    import yaml
    from project import deep_merge

    from visiontune.config import parse_params

    raw = deep_merge(yaml.safe_load(params_file.read_text(encoding="utf-8")), GPU_OVERRIDES)
    return parse_params(deep_merge(raw, DRY_RUN_OVERRIDES) if dry_run else raw)


def git_commit() -> str | None:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        )
    except OSError:
        return None
    return done.stdout.strip() or None


def ratios(record: dict[str, Any], params: Any) -> dict[str, float | None]:
    """Each stage against the limit measured next to it (bench/summary.py's definitions)."""
    from summary import ratio, stage_limit

    limits, stages = record.get("limits") or {}, record.get("stages") or {}
    if "forward" not in limits:
        return {}
    pre_bs, tta_bs = str(params.precompute.batch_size), str(params.tta.batch_size)
    forward_pre = stage_limit(limits, "precompute", limits["forward"][pre_bs]["images_per_s"])
    forward_tta = stage_limit(limits, "evaluate", limits["forward"][tta_bs]["images_per_s"])
    train = stage_limit(limits, "finetune", limits["train_step"]["images_per_s"])
    pre, head = stages.get("precompute", {}), stages.get("train_head", {})
    ft, ev = stages.get("finetune", {}), stages.get("evaluate", {})
    epoch_rate = statistics.median(ft["epoch_images_per_s"]) if ft else None
    epoch_s = statistics.median(row["seconds"] for row in ft["history"]) if ft else None
    # evaluate reports images (all views of one) per second: per view here.
    view_rate = ev["images_per_s"] * ev["n_views"] if ev else None
    return {
        "precompute_vs_forward": ratio(pre.get("images_per_s"), forward_pre["images_per_s"]),
        "finetune_epoch_vs_train_step": ratio(epoch_rate, train["images_per_s"]),
        "evaluate_vs_forward": ratio(view_rate, forward_tta["images_per_s"]),
        "train_head_vs_finetune_epoch": ratio(head.get("wall_s"), epoch_s),
    }


def compare_decoding(check: Check, params: Any, paths: list[Path], probe: Any) -> None:
    """JPEG decoding of the photos `paths`: the pipeline's CPU loader workers against
    torchvision's `decode_jpeg` on the GPU (nvJPEG; on the CPU in a dry run), decode alone
    and with the eval resize and crop, each also against the forward limit (below 1: the
    model waits for decoding)."""
    from gpu_probes import DecodeOnly, jpeg_decoder, loader_rate, tensor_decode

    from visiontune.data.dataset import ImageDataset
    from visiontune.data.transforms import create_eval_transform, eval_min_size

    runtime, cfg, limits = probe.runtime, probe.data_config, check.record["limits"]
    batch = params.precompute.batch_size
    eval_set = ImageDataset(paths, None, create_eval_transform(cfg), min_size=eval_min_size(cfg))
    cpu = {
        "decode": loader_rate(DecodeOnly(paths), batch, runtime),
        "eval_transform": loader_rate(eval_set, batch, runtime),
    }
    device = {
        "decode": tensor_decode(paths, runtime.device, batch),
        "eval_transform": tensor_decode(
            paths, runtime.device, batch, cfg.resize_size, cfg.image_size, cfg.interpolation
        ),
    }
    forward = limits["forward"][str(batch)]["images_per_s"]
    check.record["decode"] = {
        "images": len(paths),
        "cpu_jpeg_decoder": jpeg_decoder(),
        "cpu_workers": cpu,
        "decode_jpeg": {"device": str(runtime.device), **device},
        "decode_jpeg_vs_cpu_workers": {
            k: device[k]["images_per_s"] / cpu[k]["images_per_s"] for k in cpu
        },
        "eval_transform_vs_forward": {
            "cpu_workers": cpu["eval_transform"]["images_per_s"] / forward,
            "decode_jpeg": device["eval_transform"]["images_per_s"] / forward,
        },
    }


def summary_lines(record: dict[str, Any]) -> list[str]:
    def num(value: Any, fmt: str = ".1f") -> str:
        return format(value, fmt) if isinstance(value, int | float) else "-"

    host, lim = record.get("host", {}), record.get("limits") or {}
    stages, r = record.get("stages", {}), record.get("ratios", {})
    fwd = next(iter((lim.get("forward") or {}).values()), {})
    lines = [
        f"{host.get('device_name', 'cpu (dry run)')}, torch {host.get('torch')}, "
        f"{lim.get('precision')}, {lim.get('num_workers')} workers, JPEGs by "
        f"{host.get('jpeg_decoder')}: forward {num(fwd.get('images_per_s'))} img/s, "
        f"train step {num((lim.get('train_step') or {}).get('images_per_s'))} img/s",
    ]
    for name in (*REQUIRED_STAGES, "finetune_fp16"):
        s = stages.get(name)
        if not s:
            continue
        wait = (s.get("data_wait") or {}).get("wait_share")
        lines.append(
            f"  {name:<14} {num(s.get('wall_s'))} s, {num(s.get('images_per_s'))} img/s, "
            f"data wait {num(wait, '.0%')}, peak GPU {num(s.get('peak_gpu_allocated_mib'), '.0f')}"
            f" MiB, acc {num(s.get('valid_acc', s.get('accuracy_tta')), '.4f')}"
        )
    lines.append("  ratios: " + ", ".join(f"{k} {num(v, '.3f')}" for k, v in r.items()))
    dec = record.get("decode") or {}
    if dec:
        vs_cpu, vs_fwd = dec["decode_jpeg_vs_cpu_workers"], dec["eval_transform_vs_forward"]
        lines.append(
            f"  decode_jpeg on {dec['decode_jpeg']['device']} vs {lim.get('num_workers')} CPU "
            f"workers ({dec['cpu_jpeg_decoder']}): {num(vs_cpu['decode'], '.2f')}x decoding, "
            f"{num(vs_cpu['eval_transform'], '.2f')}x with the eval resize; vs the forward: "
            f"workers {num(vs_fwd['cpu_workers'], '.2f')}, decode_jpeg "
            f"{num(vs_fwd['decode_jpeg'], '.2f')}"
        )
    coll = record.get("collective") or {}
    if coll:
        lines.append(f"  {coll.get('backend')} all-reduce: {'ok' if coll.get('ok') else 'FAILED'}")
    for name in record.get("errors", {}):
        lines.append(f"  FAILED: {name}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT / ".gpu" / "data" / "dogscats")
    parser.add_argument("--params", type=Path, default=REPO_ROOT / "params.yaml")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--dry-run-cpu", action="store_true", help="all of it, small, on CPU")
    parser.add_argument(
        "--budget-s", type=float, default=180.0, help="skip the optional sections after this"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)

    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(
            f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda}); run it on a GPU machine, or with --dry-run-cpu",
            file=sys.stderr,
        )
        return 2
    try:
        import pydantic  # noqa: F401  (visiontune.config needs it; the lent machine lacks it)
    except ImportError:
        print(
            "gpu_check: pydantic is missing: run `make gpu-check` (installs .gpu/wheels)",
            file=sys.stderr,
        )
        return 2
    if not (args.data / "train").is_dir():
        print(
            f"gpu_check: no photos at {args.data}: run `make gpu-check-prepare` first",
            file=sys.stderr,
        )
        return 2
    return run_check(args)


def run_check(args: argparse.Namespace) -> int:
    import psutil
    from gpu_probes import collective_smoke, host_info, slug
    from limits import LimitProbe, measure_limits

    from visiontune.data.manifest import read_split
    from visiontune.distributed import resolve_backend
    from visiontune.runtime import resolve_runtime

    params = build_params(args.params, args.dry_run_cpu)
    runtime = resolve_runtime(params.base, params.runtime)
    name = "dry-run-cpu" if args.dry_run_cpu else slug(torch.cuda.get_device_name(runtime.device))
    # The dry run takes each limit once: on a CPU a first train step can take seconds.
    check = Check(args.results / f"gpu-{name}.json", args.budget_s, 0 if args.dry_run_cpu else 10)
    work = Path(tempfile.mkdtemp(prefix="visiontune-gpu-check-"))
    record = check.record
    record.update(
        kind="gpu-check",
        dry_run=args.dry_run_cpu,
        started=dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        # Python start-up and imports, before wall_s starts counting.
        startup_s=time.time() - psutil.Process().create_time(),
        commit=git_commit(),
        host=host_info(runtime.device),
        params=params.model_dump(mode="json"),
        limits=None,
    )
    image_root = args.data.resolve()
    say(f"gpu check on {record['host'].get('device_name', 'cpu')}, writing {check.path}")
    try:
        with check.section("split"):
            record["subset"] = {
                "root": image_root.name,
                **write_split(image_root, params, work / "split"),
            }
        probe = None
        with check.section("limits"):
            probe = LimitProbe(params, num_classes=len(record["subset"]["classes"]))
            timing = DRY_RUN_TIMING if args.dry_run_cpu else GPU_TIMING
            decode_images = 16 if args.dry_run_cpu else 384
            record["limits"] = measure_limits(probe, image_root, decode_images, timing=timing)
        if probe is not None and not {"split", "limits"} & record["errors"].keys():
            run_stages(check, params, work, image_root, probe)
            with check.section("ratios"):
                record["ratios"] = ratios(record, params)
            with check.section("decode"):
                split = work / "split"
                paths = [
                    Path(path)
                    for table in ("train.csv", "valid.csv")
                    for path in read_split(split / table, image_root)["path"]
                ]
                compare_decoding(check, params, paths, probe)
        with check.section("collective", optional=True) as run:
            if run:
                backend = resolve_backend(params.distributed.backend, runtime.device.type)
                record["collective"] = collective_smoke(backend)
                if not record["collective"]["ok"]:
                    raise RuntimeError(record["collective"].get("error", "wrong values"))
        ran = set(record.get("stages", {}))
        record["ok"] = not record["errors"] and ran.issuperset(REQUIRED_STAGES)
    finally:
        check.write()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    print("\n".join(summary_lines(record)), flush=True)
    say(f"{'ok' if record['ok'] else 'FAILED'} in {check.elapsed:.0f} s: {check.path}")
    return 0 if record["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
