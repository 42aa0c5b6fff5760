"""MLflow tracking of pipeline stages, the only package that imports mlflow: `preflight`
opens a stage's run before its work, `log_stage` logs the outputs it wrote and closes it."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visiontune.config import Params
from visiontune.fileio import sha256_file
from visiontune.tracking.store import (
    TrackingError,
    TrackingUnavailableError,
    check_reachable,
    first_use_lock,
    redact,
    repo_root,
    resolve_store,
)

if TYPE_CHECKING:  # mlflow takes ~1.5 s to import: only the stages that log pay for it
    from visiontune.tracking.runs import StageTracker

__all__ = [
    "NoTracking",
    "TrackingError",
    "TrackingUnavailableError",
    "log_stage",
    "preflight",
]

logger = logging.getLogger(__name__)


class NoTracking:
    """The tracker of a stage that logs nothing (tracking off, ranks > 0, or before its run
    opens): it accepts what a stage sends while it runs, without importing mlflow."""

    enabled = False

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        pass

    def end(self, status: str) -> None:
        pass


def preflight(
    params: Params,
    stage: str,
    *,
    environ: Mapping[str, str],
    runtime_tags: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 5.0,
) -> StageTracker | NoTracking:
    """Open `stage`'s run before any work; raise TrackingUnavailableError if that fails (with
    `tracking.required: false`, warn and return a NoTracking). `environ` supplies
    MLFLOW_TRACKING_URI (overrides `tracking.uri`), DVC_ROOT (the repo relative stores resolve
    against), DVC_EXP_NAME and VISIONTUNE_PIPELINE_ID; `runtime_tags` the device, precision."""
    section = params.tracking
    if not section.enabled:  # before importing mlflow: a machine may lack it (the GPU check)
        return NoTracking(stage)
    from mlflow.tracking import MlflowClient

    from visiontune.tracking.orphans import close_orphaned_runs
    from visiontune.tracking.runs import start_stage_run

    if not os.environ.get("MLFLOW_LOGGING_LEVEL"):
        # mlflow logs at INFO, so a new store printed "Creating initial MLflow database
        # tables..." into the stage's output; its warnings and errors still show.
        logging.getLogger("mlflow").setLevel(logging.WARNING)
    cwd = Path.cwd() if cwd is None else cwd
    root = repo_root(environ, cwd)
    store = resolve_store(section, root, environ.get("MLFLOW_TRACKING_URI"))
    try:
        check_reachable(store, timeout_s)
        with first_use_lock(store):
            client = MlflowClient(tracking_uri=store.uri, registry_uri=store.uri)
            client.search_registered_models(max_results=1)  # creates a new store's tables
        for run_id in close_orphaned_runs(client):
            print(f"{stage}: closed run {run_id} as KILLED (its stage was killed)")
        return start_stage_run(
            client, store, params, stage, environ=environ, root=root, cwd=cwd, tags=runtime_tags
        )
    except Exception as exc:
        message = redact(f"MLflow tracking store {store.uri} is not usable: {exc}")
        if section.required:
            raise TrackingUnavailableError(
                f"{message}\n(set tracking.required: false to run with local outputs only, "
                "or tracking.enabled: false to turn tracking off)"
            ) from exc
        logger.warning("%s; continuing without tracking (tracking.required is false)", message)
        return NoTracking(stage)


def log_stage(
    tracker: StageTracker | NoTracking,
    params: Params,
    out_dir: str | Path,
    *,
    manifest: Path = Path("data/prepared/manifest.csv"),
    model: Path | None = None,
) -> int:
    """Log a finished stage from its output folder (left untouched) and close its run;
    `model`, the model file evaluate wrote, becomes the run's registered MLflow model. The exit
    code: 1 when logging failed and tracking is required (DVC then does not record the stage,
    so the next `dvc repro` re-runs and re-logs it), else 0."""
    if not tracker.enabled:
        return 0
    from visiontune.tracking.collect import collect

    try:
        record = collect(tracker.stage, Path(out_dir))
        tracker.log_params(record.params)
        tracker.log_metrics(record.metrics)
        tracker.log_series(record.series)
        for path, artifact_path in record.artifacts:
            tracker.log_artifact(path, artifact_path)
        tracker.log_metrics(record.parent_metrics, parent=True)
        fingerprint = sha256_file(manifest) if manifest.is_file() else None
        tags = {"data.fingerprint": fingerprint, **record.tags}
        tracker.set_tags(tags)
        tracker.set_tags(tags, parent=True)
        if fingerprint is not None:
            tracker.log_dataset(params.data.source, fingerprint)
        if model is not None:
            from visiontune.tracking.model import log_model

            log_model(tracker, model, params.tracking)
        tracker.end("FINISHED")
    except Exception as exc:
        with contextlib.suppress(Exception):  # the store is what failed
            tracker.end("FAILED")
        message = (
            f"logging stage {tracker.stage!r} to MLflow failed: {type(exc).__name__}: {exc}. "
            f"Its outputs in {out_dir} are complete and kept."
        )
        if params.tracking.required:
            print(f"error: {message} (tracking.required is true)", file=sys.stderr)
            return 1
        logger.warning("%s (tracking.required is false: continuing)", message)
    return 0
