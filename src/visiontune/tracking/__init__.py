"""MLflow tracking of pipeline stages: the only package that imports mlflow.

The stage runner (`visiontune.stagekit`) calls `preflight` before any work: it closes the
runs of stages that were killed, then opens the stage's run (failing fast on an
unreachable store). Long stages log each epoch as it ends (`StageTracker.log_epoch`); the
runner calls `log_stage` after all outputs are written, and everything logged there is
read from those outputs.

Failure policy: with `tracking.required: true` an unreachable store stops the stage before
its long work and before it writes anything (exit 3 from the stage), and a logging error
after the outputs are written makes the stage exit 1 (DVC then does not record it, so the
next `dvc repro` re-runs and re-logs it; the outputs stay on disk). With `required: false`
both only warn and the stage succeeds.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import visiontune
from visiontune.config import Params, TrackingParams, flatten
from visiontune.fileio import sha256_file
from visiontune.tracking.store import (
    DVC_EXP_NAME_ENV,
    TRACKING_URI_ENV,
    Store,
    TrackingError,
    TrackingUnavailableError,
    check_reachable,
    first_use_lock,
    git_remote_url,
    git_state,
    logging_failed,
    pipeline_id,
    redact,
    repo_root,
    resolve_store,
)

if TYPE_CHECKING:
    from visiontune.tracking.runs import StageTracker

__all__ = [
    "NoTracking",
    "StageTracker",
    "Store",
    "TrackingError",
    "TrackingUnavailableError",
    "log_stage",
    "preflight",
    "resolve_store",
]

logger = logging.getLogger(__name__)


def __getattr__(name: str) -> Any:
    # mlflow takes ~1.5 s to import: only the stages that log pay for it.
    if name == "StageTracker":
        from visiontune.tracking.runs import StageTracker

        return StageTracker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class NoTracking:
    """The tracker of a stage that logs nothing (tracking off, ranks > 0, or before its run
    opens): it accepts what a stage sends while it runs, without importing mlflow."""

    enabled = False
    required = False

    def __init__(self, stage: str) -> None:
        self.stage = stage

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Nothing to log to."""

    def end(self, status: str) -> None:
        """No run to close."""


DEFAULT_MANIFEST = Path("data/prepared/manifest.csv")


def preflight(
    params: Params,
    stage: str,
    *,
    environ: Mapping[str, str],
    runtime_tags: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float = 5.0,
) -> StageTracker | NoTracking:
    """Open `stage`'s run before any work; raise TrackingUnavailableError if that fails.

    `environ` supplies MLFLOW_TRACKING_URI (overrides `tracking.uri`), DVC_ROOT (the repo
    relative stores resolve against), DVC_EXP_NAME and VISIONTUNE_PIPELINE_ID;
    `runtime_tags` the device and precision the stage runs with. Runs left RUNNING by
    killed stages of this host are closed first. With `tracking.required: false` a failure
    only warns and returns a disabled tracker.
    """
    section: TrackingParams = params.tracking
    if not section.enabled:  # before importing mlflow: a machine may lack it (the GPU check)
        return NoTracking(stage)
    from mlflow.tracking import MlflowClient

    from visiontune.tracking.orphans import close_orphaned_runs
    from visiontune.tracking.runs import quiet_mlflow_logging, start_stage_run

    quiet_mlflow_logging()
    cwd = Path.cwd() if cwd is None else cwd
    root = repo_root(environ, cwd)
    store = resolve_store(section, root, environ.get(TRACKING_URI_ENV))
    try:
        check_reachable(store, timeout_s)
        with first_use_lock(store):
            # Opening a new SQLite store creates (or migrates) its tables: two queued
            # experiments starting at once must not both do it.
            client = MlflowClient(tracking_uri=store.uri, registry_uri=store.uri)
            client.search_registered_models(max_results=1)
        for run_id in close_orphaned_runs(client):
            print(f"{stage}: closed run {run_id} as KILLED (its stage was killed)")
        commit, dirty = git_state(cwd)
        # The UI's Source column: the repo DVC ran in (never an experiment's temp copy,
        # which is deleted), the commit, and the remote it links to when there is one.
        source = {
            "mlflow.source.type": "LOCAL",
            "mlflow.source.git.commit": commit,
            "mlflow.source.git.repoURL": git_remote_url(root),
        }
        common = {"visiontune.version": visiontune.__version__, **(runtime_tags or {})}
        parent_tags = {
            **common,
            **source,
            "mlflow.source.name": str(root),
            "git.commit": commit,
            "git.dirty": None if dirty is None else str(dirty).lower(),
            "dvc.exp_name": environ.get(DVC_EXP_NAME_ENV) or None,
            "dvc.baseline_rev": environ.get("DVC_EXP_BASELINE_REV") or None,
            "backbone": params.model.backbone,
        }
        return start_stage_run(
            client,
            store,
            experiment=section.experiment,
            stage=stage,
            pipeline_key=pipeline_id(environ, os.getpid()),
            required=section.required,
            parent_params=flatten(params),
            parent_tags=parent_tags,
            run_tags={**common, **source, "mlflow.source.name": f"{root}/stages/{stage}.py"},
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
    metrics: Mapping[str, float] | None = None,
    manifest: Path = DEFAULT_MANIFEST,
    model: Path | None = None,
) -> int:
    """Log a finished stage from its output folder and close its run; return the exit code.

    0 when logged (or tracking is off); 1 when logging failed and tracking is required.
    The outputs are never touched. `metrics` adds scalars the stage has but did not write.
    `model` (a model file evaluate wrote, with the inference settings it scored) is logged
    as the run's MLflow model and registered.
    """
    if not tracker.enabled:
        return 0
    from visiontune.tracking.collect import collect

    out_dir = Path(out_dir)
    try:
        record = collect(tracker.stage, out_dir, metrics)
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

            log_model(
                tracker,
                model,
                registered_model=params.tracking.registered_model,
                alias=params.tracking.alias,
            )
        tracker.end("FINISHED")
    except Exception as exc:
        # The store is what failed; the message below says so.
        with contextlib.suppress(Exception):
            tracker.end("FAILED")
        return logging_failed(
            tracker.stage, f"{type(exc).__name__}: {exc}", out_dir, required=tracker.required
        )
    return 0
