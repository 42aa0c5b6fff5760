"""`make bench`: speed and accuracy of the real pipeline on ../shared/data, against this machine.

For each dataset: copy the repo to a temp dir with benchmark params, measure the machine's
limits with the same settings, run every dvc.yaml stage as its own measured subprocess (the
limits again right before and after the stages compared with them), fit the logistic
baseline on the same features, and write bench/results/<dataset>.json and .md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from baseline import logistic_baseline
from project import REPO_ROOT, deep_merge, git_state, make_project, portable, run_pipeline
from summary import collect_outputs, markdown, summarize

BENCH = Path(__file__).resolve().parent
# Two ImageNet-class sets (the course's) and one far from ImageNet (handwritten digits).
CLASS_COUNTS = {"dogscats": 2, "dogbreeds": 120, "digits": 10}


def bench_params(name: str, data_root: Path, quick: bool, tracking: bool) -> dict[str, Any]:
    """The repo's params.yaml with bench/params/<name>.yaml (and quick.yaml) on top, and the
    dataset's absolute paths (the copy lives elsewhere)."""
    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    for layer in [f"{name}.yaml"] + (["quick.yaml"] if quick else []):
        params = deep_merge(params, yaml.safe_load((BENCH / "params" / layer).read_text()) or {})
    root = (data_root / name).resolve()
    data = {"source": str(root), "labels": None}
    if name == "dogbreeds":
        data = {"source": str(root / "train"), "labels": str(root / "labels.csv")}
    return deep_merge(params, {"data": data, "tracking": {"enabled": tracking}})


def bench_dataset(name: str, args: argparse.Namespace) -> dict[str, Any]:
    from visiontune.config import load_params
    from visiontune.fileio import write_json, write_text

    params = bench_params(name, args.data_root, args.quick, not args.no_tracking)
    workdir = Path(tempfile.mkdtemp(prefix=f"visiontune-bench-{name}-"))
    project = make_project(workdir / "repo", params)
    print(f"== {name} ({'quick' if args.quick else 'full'}) in {project}", flush=True)
    typed = load_params(project / "params.yaml")  # fail fast on a bad override
    started = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    record: dict[str, Any] = {"dataset": name, "quick": args.quick, "started": started,
                              "git": git_state(), "params": typed.model_dump(mode="json"),
                              "limits": None}  # fmt: skip
    around = None
    if not args.no_limits:
        from limits import LimitProbe, measure_limits

        print("-- machine limits", flush=True)
        probe = LimitProbe(typed, num_classes=CLASS_COUNTS[name])
        source = Path(params["data"]["source"])
        limits = record["limits"] = measure_limits(probe, source, 128 if args.quick else 384)

        def around(stage: str, when: str) -> None:
            if (measured := probe.around(stage)) is not None:
                limits.setdefault("adjacent", {}).setdefault(stage, {})[when] = measured
                print(f"  {measured['limit']} limit {when}: {measured['images_per_s']:.1f} img/s")

    print("-- pipeline", flush=True)
    runs = run_pipeline(project, around=around)
    record["stages_ok"] = bool(runs) and all(r.returncode == 0 for r in runs)
    outputs = record["outputs"] = collect_outputs(project)
    features = project / "outputs" / "features" / "features.safetensors"
    if features.is_file():
        outputs["baseline"] = logistic_baseline(features)
    stages = [r.to_dict() for r in runs]
    record["summary"] = summarize(stages, outputs, record["params"], record["limits"])
    results = args.results / f"{name}{'-quick' if args.quick else ''}.json"
    record = portable(record)
    write_json(results, record)
    write_text(results.with_suffix(".md"), markdown(name, record))
    print(markdown(name, record), flush=True)
    if not args.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=[*CLASS_COUNTS, "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke run: few images, 1 epoch")
    parser.add_argument("--no-limits", action="store_true", help="skip the machine limits")
    parser.add_argument("--no-tracking", action="store_true", help="tracking.enabled: false")
    parser.add_argument("--data-root", type=Path, default=REPO_ROOT.parent / "shared" / "data")
    parser.add_argument("--results", type=Path, default=BENCH / "results")
    parser.add_argument("--keep", action="store_true", help="keep the temp project copy")
    args = parser.parse_args(argv)
    names = list(CLASS_COUNTS) if args.dataset == "all" else [args.dataset]
    return 0 if all([bench_dataset(name, args)["stages_ok"] for name in names]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
