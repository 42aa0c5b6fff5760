"""`make gpu-check`: the pipeline's stages on a lent GPU machine, as dvc.yaml runs them, measured.

fetch → split → precompute → train_head → lr_find → finetune → evaluate run from dvc.yaml's
own commands in a work folder, on the photos `make gpu-check-prepare` put in `.gpu/data`,
with device cuda, precision auto and tracking off (that machine has no DVC and no MLflow).
Each stage's files report its images/s, the share of its loop spent waiting for the loader
and its peak GPU memory; bench/summary.py sets them against the forward and train-step limits
measured beside them (bench/limits.py). Then: the eval decoding of the CPU loader workers
against nvJPEG, one fp16 fine-tune epoch (GradScaler: `auto` picks bf16 where the GPU has
it) and a one-rank NCCL all-reduce. Writes bench/results/gpu-<device>.json after each
section, so a run cut short says how far it got. `--dry-run-cpu` runs it small on the CPU.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO_ROOT = BENCH.parent
sys.path[:0] = [str(BENCH), str(REPO_ROOT / "src")]  # this checkout's library

import torch  # noqa: E402
import yaml  # noqa: E402
from project import (  # noqa: E402
    deep_merge,
    git_state,
    project_env,
    run_measured,
    run_pipeline,
    stage_argv,
)
from summary import collect_outputs, summarize  # noqa: E402

STAGES = ("fetch", "split", "precompute", "train_head", "lr_find", "finetune", "evaluate")
GPU_OVERRIDES: dict[str, Any] = {
    "base": {"device": "cuda", "precision": "auto"},
    # Two 1-epoch SGDR cycles: a restart, and a second epoch whose cuDNN is warm.
    "finetune": {"n_cycles": 2, "cycle_len": 1, "cycle_mult": 1},
    "tracking": {"enabled": False},
}
# On 2 shared cores: tiny images and batches, one epoch, fp32; the code paths are the GPU's.
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
GPU_TIMING = {"warmup": 3, "repeats": 3, "steps": 20}  # ms per step: more steps than a CPU's
DRY_RUN_TIMING = {"warmup": 1, "repeats": 1, "steps": 1}


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


class Record(dict):
    """The run's record, written after every section; a failed section keeps its traceback
    and the sections that do not need it still run."""

    def __init__(self, path: Path) -> None:
        super().__init__(ok=False, errors={})
        self.path, self.started = path, time.monotonic()

    def section(self, name: str, run: Any) -> bool:
        say(f"{name} ...")
        try:
            run()
        except Exception:
            self["errors"][name] = traceback.format_exc()[-4000:]
            say(f"{name} FAILED:\n{traceback.format_exc()}")
        self.save()
        return name not in self["errors"]

    def save(self) -> None:
        self["wall_s"] = time.monotonic() - self.started
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self, indent=2, default=str) + "\n", encoding="utf-8")


def make_work(work: Path, params: dict[str, Any]) -> None:
    """A project folder the stage commands run in: this checkout's code, the check's params."""
    work.mkdir(parents=True, exist_ok=True)
    for name in ("src", "stages"):
        (work / name).symlink_to(REPO_ROOT / name)
    shutil.copy(REPO_ROOT / "dvc.yaml", work / "dvc.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def nvjpeg_decode(paths: list[Path], device: torch.device, batch: int, cfg: Any) -> dict:
    """Images/s of torchvision's `decode_jpeg` on `device` (nvJPEG on CUDA), then the
    library's `eval_crop` there, from bytes in memory: median of 3 passes after one."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from visiontune.data.transforms import eval_crop

    data = [torch.frombuffer(bytearray(p.read_bytes()), dtype=torch.uint8) for p in paths]

    def one_pass() -> float:
        start = time.perf_counter()
        for i in range(0, len(data), batch):
            images = decode_jpeg(data[i : i + batch], mode=ImageReadMode.RGB, device=device)
            torch.stack([eval_crop(image, cfg) for image in images])
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return len(data) / (time.perf_counter() - start)

    one_pass()  # nvJPEG handles, resize kernels, page cache
    return {"images": len(data), "images_per_s": statistics.median(one_pass() for _ in range(3))}


COLLECTIVE = """
import datetime, sys, tempfile, torch, torch.distributed as dist
nccl = sys.argv[1] == "nccl"
device = torch.device("cuda", 0) if nccl else torch.device("cpu")
with tempfile.TemporaryDirectory() as tmp:
    store = dist.FileStore(f"{tmp}/store", 1)
    dist.init_process_group(sys.argv[1], store=store, rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    tensor = torch.arange(4, dtype=torch.float32, device=device)
    dist.all_reduce(tensor)
    dist.destroy_process_group()
print(tensor.cpu().tolist())
"""


def collective(backend: str) -> dict[str, Any]:
    """A one-rank all-reduce of `backend`, in a child process: a hang costs 90 s at most."""
    done = subprocess.run([sys.executable, "-c", COLLECTIVE, backend], capture_output=True,
                          text=True, timeout=90)  # fmt: skip
    ok = done.returncode == 0 and done.stdout.strip() == "[0.0, 1.0, 2.0, 3.0]"
    if not ok:
        raise RuntimeError(f"{backend} all-reduce: exit {done.returncode}: {done.stderr[-2000:]}")
    return {"backend": backend, "ok": True}


def host(device: torch.device) -> dict[str, Any]:
    from visiontune.data import pixels

    info = {"python": platform.python_version(), "torch": torch.__version__,
            "cuda_build": torch.version.cuda,
            "jpeg_decoder": "pillow" if pixels.decode_jpeg is None else "torchcodec"}  # fmt: skip
    if device.type == "cuda":
        info |= {"device_name": torch.cuda.get_device_name(device),
                 "bf16_supported": torch.cuda.is_bf16_supported(),
                 "cudnn": torch.backends.cudnn.version()}  # fmt: skip
    return info


def run_check(args: argparse.Namespace) -> int:
    from limits import LimitProbe, measure_limits

    from visiontune.config import parse_params
    from visiontune.distributed import resolve_backend
    from visiontune.runtime import resolve_runtime

    raw = deep_merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), GPU_OVERRIDES)
    raw = deep_merge(raw, DRY_RUN_OVERRIDES) if args.dry_run_cpu else raw
    raw["data"] |= {"source": str(args.data.resolve()), "labels": None}
    params = parse_params(raw)
    runtime = resolve_runtime(params.base, params.runtime)
    name = "dry-run-cpu" if args.dry_run_cpu else torch.cuda.get_device_name(runtime.device)
    record = Record(args.results / f"gpu-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.json")
    record |= {"kind": "gpu-check", "dry_run": args.dry_run_cpu, "git": git_state(),
               "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
               "host": host(runtime.device), "params": params.model_dump(mode="json")}  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="visiontune-gpu-check-"))
    make_work(work, raw)
    probe: Any = None
    steps = 0 if args.dry_run_cpu else 10  # each limit again before and after its stage

    def limits() -> None:
        nonlocal probe
        probe = LimitProbe(params, num_classes=len(list((args.data / "train").iterdir())))
        timing = DRY_RUN_TIMING if args.dry_run_cpu else GPU_TIMING
        images = 16 if args.dry_run_cpu else 384
        record["limits"] = measure_limits(probe, args.data, images, timing=timing)
        record["limits"]["adjacent"] = {}

    def around(stage: str, when: str) -> None:
        measured = probe.around(stage, steps=steps) if steps else None
        if measured is not None:
            record["limits"]["adjacent"].setdefault(stage, {})[when] = measured

    def stages() -> None:
        runs = run_pipeline(work, around=around, only=STAGES, commit=False)
        record["stages"] = [run.to_dict() for run in runs]
        failed = [run for run in runs if run.returncode != 0]
        if failed or len(runs) < len(STAGES):
            raise RuntimeError(f"stage failed: {failed[0].name if failed else '?'}")
        outputs = collect_outputs(work)
        record["summary"] = summarize(record["stages"], outputs, raw, record["limits"])

    def fp16() -> None:
        if runtime.device.type != "cuda":
            record["fp16"] = "skipped: fp16 autocast on a CPU is emulated, seconds a step"
            return
        one = deep_merge(raw, {"base": {"precision": "fp16"},
                               "finetune": {"n_cycles": 1, "cycle_len": 1}})  # fmt: skip
        (work / "params-fp16.yaml").write_text(yaml.safe_dump(one, sort_keys=False))
        argv = stage_argv("finetune", work, params="params-fp16.yaml", out="outputs/finetune-fp16")
        command = [sys.executable, "stages/finetune.py", *argv]
        run = run_measured("finetune_fp16", command, work, project_env(work), work / "fp16.log")
        if run.returncode != 0:
            raise RuntimeError(f"finetune at fp16 failed ({run.returncode}):\n{run.log[-3000:]}")
        metrics = json.loads((work / "outputs/finetune-fp16/metrics.json").read_text())
        record["fp16"] = {**run.to_dict(), **metrics}

    def decode() -> None:
        from visiontune.data.manifest import read_split

        valid = read_split(work / "data/split/valid.csv", work / "data/prepared")
        paths = [Path(path) for path in valid["path"]]
        batch, cfg = params.precompute.batch_size, probe.data_config
        gpu = nvjpeg_decode(paths, runtime.device, batch, cfg)
        cpu = record["limits"]["decode"]["eval"]["images_per_s"]
        record["decode"] = {"nvjpeg": gpu, "nvjpeg_vs_cpu_workers": gpu["images_per_s"] / cpu}

    ran = record.section("limits", limits) and record.section("stages", stages)
    if ran:
        record.section("fp16", fp16)
        record.section("decode", decode)
    backend = resolve_backend(params.distributed.backend, runtime.device.type)
    record.section("collective", lambda: record.update(collective=collective(backend)))
    record["ok"] = ran and not record["errors"]
    record.save()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    for line in summary_lines(record):
        print(line)
    say(f"{'ok' if record['ok'] else 'FAILED'} in {record['wall_s']:.0f} s: {record.path}")
    return 0 if record["ok"] else 1


def summary_lines(record: dict[str, Any]) -> list[str]:
    s, device = record.get("summary") or {}, record["host"].get("device_name", "cpu (dry run)")
    lines = [f"{device}, torch {record['host']['torch']}"]
    for row in s.get("stages", []):
        rate, wait = row["images_per_s_reported"] or 0, row["data_wait_share"] or 0
        lines.append(
            f"  {row['name']:<11} {row['wall_s']:6.1f} s  {rate:8.1f} img/s  "
            f"data wait {wait:.0%}  peak GPU {row['peak_gpu_mib'] or 0:.0f} MiB"
        )
    lines += [f"  {k}: {v:.3f}" for k, v in (s.get("ratios") or {}).items() if v is not None]
    return lines + [f"  FAILED: {name}" for name in record["errors"]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=REPO_ROOT / ".gpu" / "data" / "dogscats")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--dry-run-cpu", action="store_true", help="all of it, small, on CPU")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        print(f"gpu_check: no CUDA device here (torch {torch.__version__}, CUDA build "
              f"{torch.version.cuda}); run it on a GPU machine, or with --dry-run-cpu",
              file=sys.stderr)  # fmt: skip
        return 2
    try:
        import pydantic  # noqa: F401  (the typed params need it; the lent machine lacks it)
    except ImportError:
        print("gpu_check: no pydantic: run `make gpu-check` (installs .gpu/wheels)",
              file=sys.stderr)  # fmt: skip
        return 2
    if not (args.data / "train").is_dir():
        print(f"gpu_check: no photos at {args.data}: run `make gpu-check-prepare` first",
              file=sys.stderr)  # fmt: skip
        return 2
    return run_check(args)


if __name__ == "__main__":
    raise SystemExit(main())
