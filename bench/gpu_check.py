"""`make gpu-check`: dvc.yaml's stages on a lent GPU machine, measured against the limits
beside them, then fp16, nvJPEG decoding and an all-reduce (bench/README.md, "gpu-check").
Writes bench/results/gpu-<device>.json after each section; `--dry-run-cpu`: small, on CPU."""

from __future__ import annotations

import argparse
import importlib.util
import json
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
from project import deep_merge, git_state, run_pipeline  # noqa: E402
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
    "lr_find": {"num_iter": 5, "batch_size": 4, "end_lr": 1.0e-2},
    "finetune": {"batch_size": 4, "n_cycles": 1},
    "tta": {"n_augment": 2, "batch_size": 8},
}
GPU_TIMING = {"warmup": 3, "repeats": 3, "steps": 20}  # ms per step: more steps than a CPU's
DRY_RUN_TIMING = {"warmup": 1, "repeats": 1, "steps": 1}
COLLECTIVE = """
import sys, tempfile, torch, torch.distributed as dist
with tempfile.TemporaryDirectory() as tmp:
    dist.init_process_group(sys.argv[1], init_method=f"file://{tmp}/store", rank=0, world_size=1)
    tensor = torch.arange(4.0, device="cuda" if sys.argv[1] == "nccl" else "cpu")
    dist.all_reduce(tensor)
    dist.destroy_process_group()
print(tensor.tolist())
"""


def say(text: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def run_check(data: Path, results: Path, dry_run: bool) -> int:
    from limits import LimitProbe, measure_limits
    from torchvision.io import ImageReadMode, decode_jpeg, read_file

    from visiontune.config import parse_params
    from visiontune.data import pixels
    from visiontune.data.manifest import read_split
    from visiontune.data.transforms import eval_crop
    from visiontune.distributed import resolve_backend
    from visiontune.runtime import resolve_runtime

    raw = deep_merge(yaml.safe_load((REPO_ROOT / "params.yaml").read_text()), GPU_OVERRIDES)
    raw = deep_merge(raw, DRY_RUN_OVERRIDES) if dry_run else raw
    raw["data"] |= {"source": str(data.resolve()), "labels": None}
    params = parse_params(raw)
    device = resolve_runtime(params.base, params.runtime).device
    name = "dry-run-cpu" if dry_run else torch.cuda.get_device_name(device)
    path = results / f"gpu-{re.sub(r'[^a-z0-9]+', '-', name.lower())}.json"
    record: dict[str, Any] = {"errors": {}, "dry_run": dry_run, "git": git_state()}
    record["started"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record["host"] = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda}
    record["host"]["jpeg_decoder"] = "pillow" if pixels.decode_jpeg is None else "torchcodec"
    record["params"] = params.model_dump(mode="json")
    started = time.monotonic()

    def section(name: str, run: Any) -> bool:
        """Run one section, then save the record; a failure keeps its traceback."""
        say(f"{name} ...")
        try:
            run()
        except Exception:
            record["errors"][name] = traceback.format_exc()[-4000:]
            say(f"{name} FAILED:\n{record['errors'][name]}")
        done = all(key in record for key in ("summary", "decode", "fp16", "collective"))
        record.update(ok=done and not record["errors"], wall_s=time.monotonic() - started)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(record, indent=2, default=str) + "\n")
        return name not in record["errors"]

    work = Path(tempfile.mkdtemp(prefix="visiontune-gpu-check-"))
    for code in ("src", "stages"):  # this checkout's code, the check's params
        (work / code).symlink_to(REPO_ROOT / code)
    shutil.copy(REPO_ROOT / "dvc.yaml", work / "dvc.yaml")
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    probe: Any = None

    def limits() -> None:
        nonlocal probe
        probe = LimitProbe(params, num_classes=len(list((data / "train").iterdir())))
        timing, images = (DRY_RUN_TIMING, 16) if dry_run else (GPU_TIMING, 384)
        record["limits"] = measure_limits(probe, data, images, timing=timing) | {"adjacent": {}}

    def around(stage: str, when: str) -> None:  # each limit again next to its stage
        if not dry_run and (measured := probe.around(stage, steps=10)) is not None:
            record["limits"]["adjacent"].setdefault(stage, {})[when] = measured

    def stages() -> None:
        runs = run_pipeline(work, around=around, only=STAGES, commit=False)
        record["stages"] = [run.to_dict() for run in runs]
        if [run.returncode for run in runs] != [0] * len(STAGES):
            raise RuntimeError(f"stage failed: {[(run.name, run.returncode) for run in runs]}")
        outputs = collect_outputs(work)
        record["summary"] = summarize(record["stages"], outputs, raw, record["limits"])

    def decode() -> None:  # torchvision's decode_jpeg (nvJPEG on CUDA) + eval_crop there
        valid = read_split(work / "data/split/valid.csv", work / "data/prepared")
        jpegs = [read_file(path) for path in valid["path"]]  # bytes in memory
        batch, rates = params.precompute.batch_size, []
        for _ in range(4):  # the first pass warms nvJPEG's handles, the kernels, the page cache
            start = time.perf_counter()
            for i in range(0, len(jpegs), batch):
                images = decode_jpeg(jpegs[i : i + batch], mode=ImageReadMode.RGB, device=device)
                torch.stack([eval_crop(image, probe.data_config) for image in images])
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            rates.append(len(jpegs) / (time.perf_counter() - start))
        gpu = {"images": len(jpegs), "images_per_s": statistics.median(rates[1:])}
        cpu = record["limits"]["decode"]["eval"]["images_per_s"]
        record["decode"] = {"nvjpeg": gpu, "nvjpeg_vs_cpu_workers": gpu["images_per_s"] / cpu}

    def fp16() -> None:  # finetune again, its params.yaml at fp16 for one epoch
        if device.type != "cuda":
            record["fp16"] = "skipped: fp16 autocast on a CPU is emulated, seconds a step"
            return
        one = {"base": {"precision": "fp16"}, "finetune": {"n_cycles": 1, "cycle_len": 1}}
        (work / "params.yaml").write_text(yaml.safe_dump(deep_merge(raw, one), sort_keys=False))
        [run] = run_pipeline(work, only=("finetune",), commit=False)
        if run.returncode != 0:
            raise RuntimeError(f"finetune at fp16 failed ({run.returncode}):\n{run.log[-3000:]}")
        metrics = json.loads((work / "outputs/finetune/metrics.json").read_text())
        record["fp16"] = {**run.to_dict(), **metrics}

    def collective() -> None:  # one rank, in a child process: a hang costs 90 s at most
        backend = resolve_backend(params.distributed.backend, device.type)
        argv = [sys.executable, "-c", COLLECTIVE, backend]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=90)
        if done.returncode != 0 or done.stdout.strip() != "[0.0, 1.0, 2.0, 3.0]":
            raise RuntimeError(f"{backend} all-reduce: exit {done.returncode}: {done.stderr}")
        record["collective"] = {"backend": backend, "ok": True}

    if section("limits", limits) and section("stages", stages):
        section("decode", decode)
        section("fp16", fp16)
    section("collective", collective)
    shutil.rmtree(work, ignore_errors=True)
    say(f"{'ok' if record['ok'] else 'FAILED'} in {record['wall_s']:.0f} s: {path}")
    return 0 if record["ok"] else 1


def refuse(reason: str) -> int:
    print(f"gpu_check: {reason}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", type=Path, default=REPO_ROOT / ".gpu" / "data" / "dogscats")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--dry-run-cpu", action="store_true", help="all of it, small, on CPU")
    args = parser.parse_args(argv)
    if not args.dry_run_cpu and not torch.cuda.is_available():
        return refuse(f"no CUDA device (torch {torch.__version__}): use a GPU or --dry-run-cpu")
    if importlib.util.find_spec("pydantic") is None:  # the typed params; the GPU machine lacks it
        return refuse("no pydantic: run `make gpu-check` (installs .gpu/wheels)")
    if not (args.data / "train").is_dir():
        return refuse(f"no photos at {args.data}: run `make gpu-check-prepare` first")
    return run_check(args.data, args.results, args.dry_run_cpu)


if __name__ == "__main__":
    raise SystemExit(main())
