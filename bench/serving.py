"""`make bench-serving`: the trained model in use, against the forward limit of the same run.

- **predict**: `visiontune predict --submission` over a folder of 10,000 photos (the scale
  set's first images, generated if missing), and over a quarter of them: images/s against
  the model-only forward limit at the same batch size and precision, and peak RSS at both
  sizes (flat memory: the two peaks are close).
- **served**: the model registered as the evaluate stage registers it, served by
  `mlflow models serve --env-manager local`; batches of 32 encoded photos posted at once.

Results: bench/results/serving.json. The model is Lite0 with a fresh 2-class head (speed
does not depend on its weights), without TTA views, at the precision `auto` picks here.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests
import timm

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from limits import forward_limit, sample_images
from project import free_port
from scale_data import SHARED_DATA, link_subset, make_scale_set

from visiontune.models.backbone import pretrained_data_config
from visiontune.models.classifier import (
    InferenceSettings,
    ModelInfo,
    build_classifier,
    save_model_file,
)
from visiontune.runtime import AutoMemory, configure_memory, cpu_supports_bf16, prepare_module
from visiontune.serving.predictor import inference_runtime

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
BATCH = 32


def build_model(folder: Path, precision: str) -> Path:
    # An evaluated model's record, the centre crop at `precision`; the weights' values do
    # not change the speed.
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    info = ModelInfo(
        backbone="tf_efficientnet_lite0", weights_source="none", weights_sha256=None,
        classes=["cats", "dogs"], data_config=pretrained_data_config(body),
        head_in_features=body.num_features, head_hidden=(), head_dropout=0.0,
        head_init="random", domain="near", mirror_symmetric=True, mirror=True,
        inference=InferenceSettings(0, 1.0, precision),
    )  # fmt: skip
    model = build_classifier(info)
    save_model_file(folder / "model.safetensors", model.eval(), info)
    return folder / "model.safetensors"


def photos(scratch: Path, count: int) -> Path:
    """A folder of the first `count` images of the scale set (generated once, kept)."""
    full = scratch / "scale-s0-50000"
    if not full.is_dir():
        full = make_scale_set(scratch / f"scale-s0-{count}", count, workers=os.cpu_count() or 1)
    subset = scratch / f"serving-{count}"
    if not subset.is_dir():
        link_subset(full, subset, count, shared_data=SHARED_DATA)
    return subset


def measure_predict(model_file: Path, folder: Path, out: Path) -> dict[str, float]:
    """`visiontune predict --submission` as a user runs it: seconds, images/s, peak RSS."""
    usage = out.with_suffix(".rusage.json")
    command = [sys.executable, str(REPO / "bench/measure.py"), str(usage), "--",
               str(BIN / "visiontune"), "predict", str(model_file), str(folder), "--submission",
               str(out), "--id", "path", "--batch-size", str(BATCH)]  # fmt: skip
    started = time.perf_counter()
    subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    rows = sum(1 for _ in out.open()) - 1
    return {"images": rows, "seconds": seconds, "images_per_s": rows / seconds,
            "peak_rss_mb": json.loads(usage.read_text())["peak_rss_mb"]}  # fmt: skip


def register(model_file: Path, work: Path) -> str:
    """Log and register `model_file` as `bench@candidate`, as the evaluate stage does; the
    store's URI."""
    from visiontune import tracking
    from visiontune.config import load_params

    params = load_params(REPO / "params.yaml")
    section = params.tracking.model_copy(update={
        "uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_location": str(work / "mlruns"),
        "experiment": "bench", "registered_model": "bench", "alias": "candidate"})  # fmt: skip
    params = params.model_copy(update={"tracking": section})
    tracker = tracking.preflight(params, "evaluate", environ={}, cwd=work)
    if tracking.log_stage(tracker, params, work, model=model_file) != 0:
        raise RuntimeError("logging the model failed")
    return section.uri


def measure_served(model_file: Path, files: list[Path], work: Path, batches: int) -> dict:
    """Register the model as evaluate does, serve it, post `batches` batches of 32 photos."""
    uri = register(model_file, work)
    port = free_port()
    # The venv's bin first: the server execs its own `uvicorn`.
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
    }
    log = (work / "serve.log").open("w")
    server = subprocess.Popen(
        [str(BIN / "mlflow"), "models", "serve", "-m", "models:/bench@candidate",
         "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if requests.get(f"http://127.0.0.1:{port}/ping", timeout=2).ok:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not start:\n"
                                   f"{(work / 'serve.log').read_text()[-3000:]}")  # fmt: skip
            time.sleep(0.5)
        payloads = []
        for b in range(batches + 1):
            chunk = files[(b * BATCH) % len(files) :][:BATCH]
            images = [base64.b64encode(f.read_bytes()).decode() for f in chunk]
            payloads.append(
                json.dumps(
                    {"dataframe_split": {"columns": ["image"], "data": [[i] for i in images]}}
                )
            )
        url, headers = f"http://127.0.0.1:{port}/invocations", {"Content-Type": "application/json"}
        requests.post(url, data=payloads[0], headers=headers, timeout=120).raise_for_status()
        started = time.perf_counter()
        for payload in payloads[1:]:
            requests.post(url, data=payload, headers=headers, timeout=120).raise_for_status()
        seconds = time.perf_counter() - started
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        log.close()
    return {"images": batches * BATCH, "seconds": seconds,
            "images_per_s": batches * BATCH / seconds}  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=20, help="batches posted to the server")
    parser.add_argument("--scratch", type=Path, default=Path("/tmp/visiontune-bench-data"))
    parser.add_argument("--results", type=Path, default=REPO / "bench/results/serving.json")
    args = parser.parse_args()
    # The allocator settings `visiontune predict` runs with, before any tensor: without them
    # the limit read 106-125 img/s, below predict's own 163.
    configure_memory(AutoMemory())
    precision = "bf16" if cpu_supports_bf16() else "fp32"
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model_file = build_model(work, precision)
        from visiontune.models.classifier import load_model_file

        model, info = load_model_file(model_file)
        runtime = inference_runtime(precision, "cpu", num_workers=0)
        size = info.data_config.image_size
        model = prepare_module(model, runtime).eval()  # laid out as predict lays it out
        quarter = photos(args.scratch, args.images // 4)
        full = photos(args.scratch, args.images)
        # The limit before and after each measurement, the best kept.
        limits = [forward_limit(model, runtime, BATCH, size, steps=8)["images_per_s"]]
        small = measure_predict(model_file, quarter, work / "quarter.csv")
        large = measure_predict(model_file, full, work / "full.csv")
        limits.append(forward_limit(model, runtime, BATCH, size, steps=8)["images_per_s"])
        served = measure_served(model_file, sample_images(full, 256), work, args.batches)
        limits.append(forward_limit(model, runtime, BATCH, size, steps=8)["images_per_s"])
        forward = max(limits)
    steady = (large["images"] - small["images"]) / (large["seconds"] - small["seconds"])
    record = {
        "precision": precision, "batch_size": BATCH, "forward_images_per_s": forward,
        "forward_readings": limits,
        "predict": {"quarter": small, "full": large,
                    "vs_forward": large["images_per_s"] / forward,
                    # The rate past start-up (imports, model load): the extra images of the
                    # full run over its extra seconds.
                    "steady_images_per_s": steady,
                    "steady_vs_forward": steady / forward,
                    "peak_rss_ratio": large["peak_rss_mb"] / small["peak_rss_mb"]},
        "served": {**served, "vs_forward": served["images_per_s"] / forward},
        "targets": {"predict_vs_forward >= 0.85": large["images_per_s"] / forward >= 0.85,
                    "predict_steady_vs_forward >= 0.85": steady / forward >= 0.85,
                    "served_vs_forward >= 0.8": served["images_per_s"] / forward >= 0.8},
    }  # fmt: skip
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
