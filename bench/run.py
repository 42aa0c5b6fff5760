"""`make bench`: speed and accuracy of the real pipeline on ../shared/data, against this machine.

For each dataset: copy the repo to a temp dir with benchmark params, measure the machine's
limits with the same settings, run every dvc.yaml stage as its own measured subprocess, fit
the logistic baseline on the same features, and write bench/results/<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import resource
import shutil
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
from summary import collect_outputs, markdown, summarize

BENCH = Path(__file__).resolve().parent
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# Two ImageNet-class sets (the course's) and two far from ImageNet: handwritten digits, and
# photo defects generated from the shared photos (bench/defects.py).
DATASETS = ("dogscats", "dogbreeds", "digits", "defects")
CLASS_COUNTS = {"dogscats": 2, "dogbreeds": 120, "digits": 10, "defects": 5}
# Above this many cores kept busy by other work on average, a run's ratios are flagged:
# quiet, the same stage varies by ~5-10 % from run to run on these 2 cores.
BUSY_OTHER_CORES = 0.25


def data_overrides(name: str, data_root: Path, scratch: Path) -> dict[str, Any]:
    """Absolute data paths for a dataset (the copy lives elsewhere); `defects` is generated
    into `scratch`, outside the repo, on first use."""
    root = (data_root / name).resolve()
    if name == "defects":
        made = scratch / "defects"
        if not made.is_dir():
            from defects import make_defects

            make_defects(made.with_suffix(".tmp"), shared_data=data_root)
            made.with_suffix(".tmp").rename(made)
        root = made
    if name == "dogbreeds":
        return {"data": {"source": str(root / "train"), "labels": str(root / "labels.csv")}}
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return {"data": {"source": str(root), "labels": None}}


def bench_params(
    name: str, data_root: Path, quick: bool, tracking: bool, scratch: Path
) -> dict[str, Any]:
    """The repo's params.yaml with the benchmark's overrides (bench/params/*.yaml) on top."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for layer in [f"{name}.yaml"] + (["quick.yaml"] if quick else []):
        params = deep_merge(params, yaml.safe_load((BENCH / "params" / layer).read_text()) or {})
    params = deep_merge(params, data_overrides(name, data_root, scratch))
    return deep_merge(params, {} if tracking else {"tracking": {"enabled": False}})


def cpu_snapshot() -> tuple[float, float]:
    """(busy CPU seconds of the whole machine, of this process and its waited-for children).

    Two snapshots tell how much CPU *other* work took in between, which the load average
    cannot: right after a run, the 1-minute load is mostly the run itself.
    """
    times = psutil.cpu_times()
    # Steal (what the hypervisor gave other guests) counts as other work; Linux already
    # counts guest time inside user time.
    skipped = ("idle", "iowait", "guest", "guest_nice")
    machine = sum(getattr(times, f) for f in times._fields if f not in skipped)
    own = sum(
        usage.ru_utime + usage.ru_stime
        for usage in map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    )
    return machine, own


def other_load(
    start: tuple[float, float] | None, end: tuple[float, float] | None, wall_s: float
) -> float | None:
    """Mean number of cores that work other than this process tree kept busy in between."""
    if start is None or end is None or wall_s <= 0:
        return None
    return max(0.0, (end[0] - start[0]) - (end[1] - start[1])) / wall_s


def wait_quiet(max_s: float) -> None:
    """Wait up to `max_s` seconds for the 1-min load to drop below half the cores."""
    deadline = time.monotonic() + max_s
    while os.getloadavg()[0] > 0.5 * (os.cpu_count() or 1) and time.monotonic() < deadline:
        time.sleep(15)


def bench_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from visiontune.config import load_params
    from visiontune.fileio import write_json, write_text

    wait_quiet(args.wait_quiet)
    print(f"== {name} ({'quick' if args.quick else 'full'})", flush=True)
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
        "params": typed.model_dump(mode="json"),
        "limits": None,
    }
    around = None
    if not args.no_limits:
        from limits import LimitProbe, measure_limits

        print("-- machine limits", flush=True)
        probe = LimitProbe(typed, num_classes=CLASS_COUNTS[name])
        images = 128 if args.quick else 384
        limits = measure_limits(probe, Path(params["data"]["source"]), decode_images=images)
        record["limits"] = limits | {"adjacent": {}}

        def around(stage: str, when: str) -> None:
            measured = probe.around(stage)
            if measured is not None:
                record["limits"]["adjacent"].setdefault(stage, {})[when] = measured
                print(f"  {measured['limit']} limit {when}: {measured['images_per_s']:.1f} img/s")

    print("-- pipeline", flush=True)
    runs = run_pipeline(project, runner=args.runner, around=around)
    record["stages_ok"] = bool(runs) and all(r.returncode == 0 for r in runs)
    outputs = record["outputs"] = collect_outputs(project)
    features = project / "outputs" / "features" / "features.safetensors"
    if features.is_file():
        outputs["baseline"] = logistic_baseline(features)
    stages = [r.to_dict() for r in runs]
    record["summary"] = summarize(stages, outputs, record["params"], record["limits"])
    record["other_load_cores"] = other_load(snapshot, cpu_snapshot(), time.monotonic() - started)
    record["busy"] = (record["other_load_cores"] or 0.0) > BUSY_OTHER_CORES
    results = args.results / f"{name}{'-quick' if args.quick else ''}.json"
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
        help="seconds to wait for the load to drop below half the cores",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp project copy")
    parser.add_argument("--scratch", type=Path,
                        default=Path(tempfile.gettempdir()) / "visiontune-bench-data",
                        help="where generated datasets (defects) go, outside the repo")  # fmt: skip
    args = parser.parse_args(argv)
    names = DATASETS if args.dataset == "all" else (args.dataset,)
    return 0 if all([bench_dataset(name, args)["stages_ok"] for name in names]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
