"""`make bench-serving`: the model in use against the same run's forward limit. `visiontune
predict --submission` over the scale set's first 10,000 and 2,500 photos; the model registered as
evaluate does, served by `mlflow models serve`, batches of 32 posted. Lite0 with a fresh 2-class
head (weights do not change speed), centre crop, at the precision `auto` picks."""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import requests
import timm
from limits import forward_limit, sample_images
from project import REPO_ROOT, free_port, run_measured
from scale import SCRATCH, scale_set

from visiontune import tracking
from visiontune.config import load_params
from visiontune.fileio import write_json
from visiontune.models.backbone import pretrained_data_config
from visiontune.models.classifier import build_classifier, save_model_file
from visiontune.models.record import InferenceSettings, ModelInfo
from visiontune.runtime import AutoMemory, configure_memory, cpu_supports_bf16, prepare_module
from visiontune.serving.predictor import inference_runtime

BIN = Path(sys.executable).parent
BATCH = 32


def predict(model_file: Path, folder: Path, out: Path) -> dict[str, float]:
    """`visiontune predict --submission` as a user runs it: seconds, images/s, peak RSS."""
    command = [BIN / "visiontune", "predict", model_file, folder, "--submission", out,
               "--id", "path", "--batch-size", BATCH]  # fmt: skip
    log = out.with_suffix(".log")
    run = run_measured("predict", list(map(str, command)), out.parent, os.environ, log)
    if run.returncode:
        raise RuntimeError(f"visiontune predict failed:\n{run.log[-3000:]}")
    rows = len(out.read_text().splitlines()) - 1
    return {"images": rows, "seconds": run.wall_s, "images_per_s": rows / run.wall_s,
            "peak_rss_mb": run.peak_rss_mb}  # fmt: skip


def serve(model_file: Path, files: list[Path], work: Path, batches: int) -> dict[str, float]:
    """Register the model as evaluate does, serve it, post `batches` batches of 32 photos
    one after another (one more first, untimed)."""
    params = load_params(REPO_ROOT / "params.yaml")
    section = params.tracking.model_copy(update={
        "uri": f"sqlite:///{work / 'mlflow.db'}", "artifact_location": str(work / "mlruns"),
        "experiment": "bench", "registered_model": "bench", "alias": "candidate"})  # fmt: skip
    params = params.model_copy(update={"tracking": section})
    tracker = tracking.preflight(params, "evaluate", environ={}, cwd=work)
    if tracking.log_stage(tracker, params, work, model=model_file) != 0:
        raise RuntimeError("logging the model failed")
    # The venv's bin first on PATH: the server execs its own `uvicorn`.
    env = {**os.environ, "MLFLOW_TRACKING_URI": section.uri, "PATH": f"{BIN}:{os.environ['PATH']}"}
    port, log = str(free_port()), work / "serve.log"
    url = f"http://127.0.0.1:{port}"
    with log.open("w") as out:
        server = subprocess.Popen(
            [BIN / "mlflow", "models", "serve", "-m", "models:/bench@candidate", "--env-manager",
             "local", "--host", "127.0.0.1", "--port", port], env=env, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{url}/ping", timeout=2).ok:
                    break
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow models serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.5)
        photos = [[base64.b64encode(f.read_bytes()).decode()] for f in files]
        rows = [photos[b * BATCH % len(photos) :][:BATCH] for b in range(batches + 1)]
        bodies = [json.dumps({"dataframe_split": {"columns": ["image"], "data": r}}) for r in rows]
        post = partial(requests.post, f"{url}/invocations", timeout=120,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        post(data=bodies[0]).raise_for_status()
        started = time.perf_counter()
        for body in bodies[1:]:
            post(data=body).raise_for_status()
        seconds = time.perf_counter() - started
    finally:  # the server's workers too
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    images = batches * BATCH
    return {"images": images, "seconds": seconds, "images_per_s": images / seconds}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--batches", type=int, default=20, help="batches posted to the server")
    parser.add_argument("--results", type=Path, default=REPO_ROOT / "bench/results/serving.json")
    args = parser.parse_args()
    # The allocator settings `visiontune predict` runs with, before any tensor: without them
    # the limit read 106-125 img/s, below predict's own 163.
    configure_memory(AutoMemory())
    precision = "bf16" if cpu_supports_bf16() else "fp32"
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    info = ModelInfo(
        backbone="tf_efficientnet_lite0", weights_source="none", weights_sha256=None,
        classes=["cats", "dogs"], data_config=pretrained_data_config(body),
        head_in_features=body.num_features, head_hidden=(), head_dropout=0.0,
        head_init="random", domain="near", mirror_symmetric=True, mirror=True,
        inference=InferenceSettings(0, 1.0, precision),
    )  # fmt: skip
    runtime, size = inference_runtime(precision, "cpu", num_workers=0), info.data_config.image_size
    model = prepare_module(build_classifier(info).eval(), runtime)  # laid out as predict does
    full, quarter = (scale_set(SCRATCH, n) for n in (args.images, args.images // 4))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        save_model_file(model_file := work / "model.safetensors", model, info)
        # The limit before and after each measurement, the best kept.
        limits = [forward_limit(model, runtime, BATCH, size, steps=8)["images_per_s"]]
        small, large = (predict(model_file, d, work / f"{d.name}.csv") for d in (quarter, full))
        limits.append(forward_limit(model, runtime, BATCH, size, steps=8)["images_per_s"])
        served = serve(model_file, sample_images(full, 256), work, args.batches)
        limits.append(forward_limit(model, runtime, BATCH, size, steps=8)["images_per_s"])
    forward = max(limits)
    # The rate past start-up (imports, model load): the full run's extra images / extra seconds.
    steady = (large["images"] - small["images"]) / (large["seconds"] - small["seconds"])
    record = {
        "precision": precision, "batch_size": BATCH, "forward_images_per_s": forward,
        "forward_readings": limits,
        "predict": {"quarter": small, "full": large, "vs_forward": large["images_per_s"] / forward,
                    "steady_images_per_s": steady, "steady_vs_forward": steady / forward,
                    "peak_rss_ratio": large["peak_rss_mb"] / small["peak_rss_mb"]},
        "served": {**served, "vs_forward": served["images_per_s"] / forward},
        "targets": {"predict_vs_forward >= 0.85": large["images_per_s"] / forward >= 0.85,
                    "predict_steady_vs_forward >= 0.85": steady / forward >= 0.85,
                    "served_vs_forward >= 0.8": served["images_per_s"] / forward >= 0.8},
    }  # fmt: skip
    write_json(args.results, record)
    print(args.results.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
