"""`make bench`: speed and accuracy of the real pipeline on ../shared/data, against this machine.

For each dataset: copy the repo to a temp dir with benchmark params, run every dvc.yaml stage
as its own measured subprocess, measure the machine's limits with the same settings, run the
fastai reference on the same split, and write bench/results/<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import logistic_baseline
from project import REPO_ROOT, deep_merge, git_state, make_project, portable, run_pipeline
from summary import collect_outputs, markdown, summarize, versus_fastai

BENCH = Path(__file__).resolve().parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
FASTAI_VENV = BENCH / ".venv-fastai"
# Two ImageNet-class sets (the course's) and two far from ImageNet: handwritten digits, and
# photo defects generated from the shared photos (bench/defects.py).
DATASETS = ("dogscats", "dogbreeds", "digits", "defects")
CLASS_COUNTS = {"dogscats": 2, "dogbreeds": 120, "digits": 10, "defects": 5}


def data_overrides(name: str, data_root: Path, scratch: Path) -> dict[str, Any]:
    """Absolute data paths for a dataset (the copy lives elsewhere, so no relative paths).

    `defects` is generated into `scratch`, outside the repo, on first use.
    """
    root = (data_root / name).resolve()
    if name in ("dogscats", "digits"):
        return {"data": {"source": str(root), "labels": None}}
    if name == "defects":
        made = scratch / "defects"
        if not made.is_dir():
            from defects import make_defects

            make_defects(made.with_suffix(".tmp"), shared_data=data_root)
            made.with_suffix(".tmp").rename(made)
        return {"data": {"source": str(made), "labels": None}}
    if name == "dogbreeds":
        return {
            "data": {
                "source": str(root / "train"),
                "labels": str(root / "labels.csv"),
            }
        }
    raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")


def bench_params(
    name: str, data_root: Path, quick: bool, tracking: bool, scratch: Path
) -> dict[str, Any]:
    """The repo's params.yaml with the benchmark's overrides (bench/params/*.yaml) on top."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    layers = [BENCH / "params" / f"{name}.yaml"] + (
        [BENCH / "params" / "quick.yaml"] if quick else []
    )
    for layer in layers:
        params = deep_merge(params, yaml.safe_load(layer.read_text()) or {})
    params = deep_merge(params, data_overrides(name, data_root, scratch))
    if not tracking:
        params = deep_merge(params, {"tracking": {"enabled": False}})
    return params


def load() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def busy() -> bool:
    """Whether other work competes for the cores (1-min load above half of them)."""
    return os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1)


# Above this many cores kept busy by other work on average, a run's throughputs are flagged:
# quiet, the same stage varies by ~5-10 % from run to run on these 2 cores.
BUSY_OTHER_CORES = 0.25
CpuSnapshot = tuple[float, float]


def cpu_snapshot() -> CpuSnapshot:
    """(busy CPU seconds of the whole machine, of this process and its waited-for children).

    Two snapshots tell how much CPU *other* work took in between, which the load average
    cannot: right after a run, the 1-minute load is mostly the run itself.
    """
    times = psutil.cpu_times()
    # Busy is all but idle and iowait; steal (what the hypervisor gave other guests, Linux)
    # counts as other work; Linux already counts guest time inside user time.
    skipped = ("idle", "iowait", "guest", "guest_nice")
    machine = sum(getattr(times, f) for f in times._fields if f not in skipped)
    own = sum(
        usage.ru_utime + usage.ru_stime
        for usage in (
            resource.getrusage(resource.RUSAGE_SELF),
            resource.getrusage(resource.RUSAGE_CHILDREN),
        )
    )
    return machine, own


def other_load(start: CpuSnapshot | None, end: CpuSnapshot | None, wall_s: float) -> float | None:
    """Mean number of cores that work other than this process tree kept busy in between."""
    if start is None or end is None or wall_s <= 0:
        return None
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / wall_s


def wait_quiet(max_s: float) -> None:
    """Wait up to `max_s` seconds for the machine to become quiet; warn if it does not."""
    deadline = time.monotonic() + max_s
    while busy() and time.monotonic() < deadline:
        time.sleep(15)
    if busy():
        print(
            f"WARNING: machine busy (load {load()} on {os.cpu_count()} cores): throughputs "
            "and ratios from this run are not representative",
            file=sys.stderr,
            flush=True,
        )


def ensure_fastai_venv(venv: Path = FASTAI_VENV) -> Path:
    """A venv with fastai that sees the project's packages (torch stays the pinned build)."""
    python = venv / "bin" / "python"
    probe = [str(python), "-c", "import fastai"]
    if python.exists() and subprocess.run(probe, capture_output=True).returncode == 0:
        return python
    print(f"creating {venv} (fastai from PyPI, pinned by constraints.txt)", flush=True)
    subprocess.run([sys._base_executable, "-m", "venv", str(venv)], check=True)
    site = subprocess.run(
        [str(python), "-c", "import site; print(site.getsitepackages()[0])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    import site as this_site

    # The project's site-packages on the new venv's path: pip then sees torch 2.14.1 as
    # installed and installs only what fastai adds, pinned by the same constraints.
    Path(site, "_visiontune_base.pth").write_text(this_site.getsitepackages()[0] + "\n")
    subprocess.run(
        [
            str(python),
            "-m",
            "pip",
            "install",
            "-q",
            "--disable-pip-version-check",
            "-c",
            str(REPO_ROOT / "constraints.txt"),
            "fastai",
        ],
        check=True,
    )
    return python


def run_fastai(project: Path, precision: str) -> dict[str, Any]:
    try:
        python = ensure_fastai_venv()
    except subprocess.CalledProcessError as exc:
        return {"error": f"fastai could not be installed here: {exc}"}
    out = project / "fastai.json"
    start = time.perf_counter()
    result = subprocess.run(
        [
            str(python),
            str(BENCH / "fastai_ref.py"),
            "--project",
            str(project),
            "--out",
            str(out),
            "--precision",
            precision,
        ],
        cwd=project,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0 or not out.exists():
        return {"error": f"fastai run failed (rc {result.returncode}): {result.stderr[-3000:]}"}
    import json

    data = json.loads(out.read_text())
    data["process_wall_s"] = time.perf_counter() - start
    return data


def bench_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from visiontune.config import load_params
    from visiontune.fileio import write_json, write_text

    wait_quiet(args.wait_quiet)
    print(f"== {name} ({'quick' if args.quick else 'full'}) load {load()}", flush=True)
    params = bench_params(name, args.data_root, args.quick, not args.no_tracking, args.scratch)
    workdir = Path(tempfile.mkdtemp(prefix=f"visiontune-bench-{name}-"))
    project = make_project(workdir / "repo", params)
    typed = load_params(project / "params.yaml")  # fail fast on a bad override
    started, snapshot = time.monotonic(), cpu_snapshot()
    record: dict[str, Any] = {
        "dataset": name,
        "quick": args.quick,
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "git": git_state(),
        "load_before": load(),
        "busy_before": busy(),
        "cpu_count": os.cpu_count(),
        "params": typed.model_dump(mode="json"),
    }
    limits, around = None, None
    if not args.no_limits:
        from limits import LimitProbe, measure_limits

        print("-- machine limits", flush=True)
        probe = LimitProbe(typed, num_classes=CLASS_COUNTS[name])
        source = Path(params["data"]["source"])
        limits = measure_limits(probe, source, decode_images=128 if args.quick else 384)
        limits["adjacent"] = {}

        def around(stage: str, when: str) -> None:
            measured = probe.around(stage)
            if measured is not None:
                limits["adjacent"].setdefault(stage, {})[when] = measured
                print(
                    f"  {'':<11} {measured['limit']} limit {when}: "
                    f"{measured['images_per_s']:.1f} img/s",
                    flush=True,
                )

    record["limits"] = limits
    print("-- pipeline", flush=True)
    runs = run_pipeline(project, runner=args.runner, around=around)
    record["stages_ok"] = bool(runs) and all(r.returncode == 0 for r in runs)
    outputs = collect_outputs(project)
    record["outputs"] = outputs
    features = project / "outputs" / "features" / "features.safetensors"
    if features.is_file():
        record["baseline"] = logistic_baseline(features)
        outputs["baseline"] = record["baseline"]
    record["summary"] = summarize([r.to_dict() for r in runs], outputs, record["params"], limits)
    if not args.no_fastai and record["stages_ok"]:
        print("-- fastai reference", flush=True)
        record["fastai"] = run_fastai(project, args.fastai_precision)
        record["summary"]["versus_fastai"] = versus_fastai(record["summary"], record["fastai"])
    elif not args.no_fastai:
        record["fastai"] = {"error": "skipped: the visiontune pipeline failed"}
    record["load_after"] = load()
    record["other_load_cores"] = other_load(snapshot, cpu_snapshot(), time.monotonic() - started)
    record["busy_during"] = (record["other_load_cores"] or 0.0) > BUSY_OTHER_CORES
    suffix = "-quick" if args.quick else ""
    results = args.results / f"{name}{suffix}.json"
    record = portable(record)
    write_json(results, record)
    write_text(results.with_suffix(".md"), markdown(name, record))
    print(markdown(name, record), flush=True)
    if args.keep:
        print(f"project copy kept at {project}")
    else:
        shutil.rmtree(workdir, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=[*DATASETS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke run: few images, 1 epoch")
    parser.add_argument("--no-fastai", action="store_true", help="skip the fastai reference")
    parser.add_argument(
        "--fastai-precision",
        choices=["auto", "fp32"],
        default="auto",
        help="auto: the same precision as visiontune (bf16 autocast on CPU)",
    )
    parser.add_argument("--no-limits", action="store_true", help="skip the machine limits")
    parser.add_argument("--no-tracking", action="store_true", help="tracking.enabled: false")
    parser.add_argument(
        "--runner",
        choices=["script", "dvc"],
        default="script",
        help="script: stage cmds then dvc commit; dvc: dvc repro -s per stage",
    )
    parser.add_argument("--data-root", type=Path, default=SHARED_DATA)
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=300.0,
        help="seconds to wait for the load to drop below half the cores before each dataset",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp project copy")
    parser.add_argument(
        "--scratch",
        type=Path,
        default=Path(tempfile.gettempdir()) / "visiontune-bench-data",
        help="where generated datasets (defects) are written, outside the repo",
    )
    args = parser.parse_args(argv)
    names = DATASETS if args.dataset == "all" else (args.dataset,)
    ok = True
    for name in names:
        record = bench_dataset(name, args)
        ok = ok and record["stages_ok"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
