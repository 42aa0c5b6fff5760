"""`make ui`: the MLflow UI on localhost over the local store the stages log to, opened at
`tracking.experiment`'s runs rather than MLflow's home page."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from visiontune.config import ParamsError, load_params
from visiontune.tracking.store import repo_root, resolve_store


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="make ui", description=__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file")
    parser.add_argument("--port", type=int, default=5000)
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
    except ParamsError as exc:
        print(exc, file=sys.stderr)
        return 2
    store = resolve_store(params.tracking, repo_root(os.environ, Path.cwd()))
    if store.is_server:
        print(f"tracking.uri is a server: open {store.uri} (make ui serves local stores only)")
        return 0
    from mlflow.tracking import MlflowClient

    name = params.tracking.experiment
    experiment = MlflowClient(tracking_uri=store.uri).get_experiment_by_name(name)
    base = f"http://127.0.0.1:{args.port}"
    if experiment:
        print(f"MLflow UI: {base}/#/experiments/{experiment.experiment_id}/runs", flush=True)
    else:
        print(f"MLflow UI: {base}/ (no runs of {name!r} yet)", flush=True)
    command = [str(Path(sys.executable).parent / "mlflow"), "ui", "--workers", "1"]
    command += ["--host", "127.0.0.1", "--port", str(args.port), "--backend-store-uri", store.uri]
    command += ["--artifacts-destination", str(store.artifact_location)]
    # MLflow's job runner (GenAI prompt jobs: three more processes) stays off.
    os.environ["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    os.execv(command[0], command)


if __name__ == "__main__":
    raise SystemExit(main())
