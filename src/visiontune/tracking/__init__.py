"""MLflow tracking of pipeline stages: the only package that imports mlflow.

A stage's `open_stage` starts a `TrackingAgent`, a helper process that runs `preflight`
(fails fast on an unreachable store) while the stage reads its inputs and builds its model;
the stage waits for it before its long work or its first output, and calls `log_stage`
after all its outputs are written. Everything logged is read from those outputs.

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
from visiontune.tracking.agent import TrackingAgent
from visiontune.tracking.store import (
    DVC_EXP_NAME_ENV,
    TRACKING_URI_ENV,
    Store,
    TrackingError,
    TrackingUnavailableError,
    check_reachable,
    file_sha256,
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
    "StageTracker",
    "Store",
    "TrackingAgent",
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


DEFAULT_MANIFEST = Path("data/prepared/manifest.csv")


def runtime_tags_of(params: Params) -> dict[str, str]:
    """The device and precision a stage runs with, as run tags."""
    try:
        from visiontune.runtime import resolve_runtime

        runtime = resolve_runtime(params.base, params.runtime)
        return {"device": str(runtime.device), "precision": runtime.precision}
    except Exception:  # a device the params ask for but this machine lacks: the stage says so
        return {"device": params.base.device, "precision": params.base.precision}


def preflight(
    params: Params,
    stage: str,
    *,
    environ: Mapping[str, str],
    cwd: Path | None = None,
    timeout_s: float = 5.0,
    pid: int | None = None,
    runtime_tags: Mapping[str, str] | None = None,
) -> StageTracker:
    """Open `stage`'s run before any work; raise TrackingUnavailableError if that fails.

    `environ` supplies MLFLOW_TRACKING_URI (overrides `tracking.uri`), DVC_ROOT (the repo
    relative stores resolve against), DVC_EXP_NAME and VISIONTUNE_PIPELINE_ID. With
    `tracking.required: false` a failure only warns and returns a disabled tracker.
    `pid` is the stage's process (default: this one) and `runtime_tags` its device and
    precision (default: resolved here), for a helper process that tracks for a stage.
    """
    from mlflow.tracking import MlflowClient

    from visiontune.tracking.runs import StageTracker, quiet_mlflow_logging, start_stage_run

    quiet_mlflow_logging()

    section: TrackingParams = params.tracking
    if not section.enabled:
        return StageTracker(stage, required=False)
    cwd = Path.cwd() if cwd is None else cwd
    store = resolve_store(section, repo_root(environ, cwd), environ.get(TRACKING_URI_ENV))
    try:
        check_reachable(store, timeout_s)
        commit, dirty = git_state(cwd)
        runtime = dict(runtime_tags) if runtime_tags is not None else runtime_tags_of(params)
        common = {"visiontune.version": visiontune.__version__, **runtime}
        parent_tags = {
            **common,
            "mlflow.source.git.commit": commit,
            "git.commit": commit,
            "git.dirty": None if dirty is None else str(dirty).lower(),
            "dvc.exp_name": environ.get(DVC_EXP_NAME_ENV) or None,
            "dvc.baseline_rev": environ.get("DVC_EXP_BASELINE_REV") or None,
            "backbone": params.model.backbone,
        }
        return start_stage_run(
            MlflowClient(tracking_uri=store.uri, registry_uri=store.uri),
            store,
            experiment=section.experiment,
            stage=stage,
            pipeline_key=pipeline_id(environ, os.getpid() if pid is None else pid),
            required=section.required,
            parent_params=flatten(params),
            parent_tags=parent_tags,
            run_tags={**common, "mlflow.source.git.commit": commit},
        )
    except Exception as exc:
        message = redact(f"MLflow tracking store {store.uri} is not usable: {exc}")
        if section.required:
            raise TrackingUnavailableError(
                f"{message}\n(set tracking.required: false to run with local outputs only, "
                "or tracking.enabled: false to turn tracking off)"
            ) from exc
        logger.warning("%s; continuing without tracking (tracking.required is false)", message)
        return StageTracker(stage, required=False)


def log_stage(
    tracker: StageTracker | TrackingAgent,
    params: Params,
    out_dir: str | Path,
    *,
    metrics: Mapping[str, float] | None = None,
    manifest: Path = DEFAULT_MANIFEST,
) -> int:
    """Log a finished stage from its output folder and close its run; return the exit code.

    0 when logged (or tracking is off); 1 when logging failed and tracking is required.
    The outputs are never touched. `metrics` adds scalars the stage has but did not write.
    With a `TrackingAgent` (what `open_stage` gives) its helper process does the logging.
    """
    if isinstance(tracker, TrackingAgent):
        return tracker.log(out_dir, metrics=metrics, manifest=manifest)
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
        tags = {"data.fingerprint": file_sha256(manifest), **record.tags}
        tracker.set_tags(tags)
        tracker.set_tags(tags, parent=True)
        model_file = out_dir / "model.safetensors"
        if tracker.stage == "finetune" and model_file.is_file():
            from visiontune.tracking.model import log_model

            log_model(
                tracker,
                model_file,
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
