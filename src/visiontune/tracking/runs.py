"""MLflow runs for one pipeline execution: a parent run found by tag, one child per stage,
all through an explicit `MlflowClient` (no global fluent state)."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH

import visiontune
from visiontune.config import Params, flatten
from visiontune.tracking.collect import epoch_metric_name
from visiontune.tracking.orphans import process_tags
from visiontune.tracking.store import Store, TrackingError, git, git_state, pipeline_id, redact

PIPELINE_TAG = "visiontune.pipeline_id"
ROLE_TAG = "visiontune.role"
# MLflow 3's UI opens an experiment of this kind on its runs, not on the GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def _tag_values(tags: Mapping[str, Any]) -> dict[str, str]:
    return {key: redact(str(value)) for key, value in tags.items() if value is not None}


def get_or_create_experiment(client: MlflowClient, name: str, store: Store) -> str:
    """The id of experiment `name`, created (with the store's artifact location) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name,
                artifact_location=store.artifact_location,
                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND},
            )
        except MlflowException:
            # Another process created it between our lookup and create.
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage != "active":
        raise TrackingError(
            f"MLflow experiment {name!r} is deleted; restore it (mlflow experiments restore "
            f"--experiment-id {experiment.experiment_id}) or set tracking.experiment"
        )
    if experiment.tags.get(EXPERIMENT_KIND_TAG) is None:  # made by an older visiontune
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return experiment.experiment_id


@dataclass(kw_only=True)
class StageTracker:
    """Logging handle of one stage: its child run and the pipeline's parent run (a stage
    that logs nothing holds `tracking.NoTracking`)."""

    enabled: ClassVar[bool] = True
    stage: str
    client: MlflowClient
    store: Store
    exp_name: str | None  # the DVC experiment this stage runs in (None: `dvc repro`)
    parent_id: str
    run_id: str
    # (metric, step) points already sent while the stage ran (`log_epoch`).
    logged_live: set[tuple[str, int]] = field(default_factory=set)
    _ended: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        # A stage that raises between opening its run and logging it must not leave its
        # runs RUNNING; a killed one is closed by the next stage's start instead.
        atexit.register(self._end_if_open)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Log one epoch's history row now, for people watching the run in the UI; the final
        logging skips these points, and decides the exit code: a failure here only warns."""
        step = int(row["epoch"])
        points = {epoch_metric_name(k): [(step, v)] for k, v in row.items() if k != "epoch"}
        try:
            self.log_series(points)
        except Exception as exc:  # the store hiccupped: the final log retries every point
            logging.getLogger("visiontune.tracking").warning(
                "live logging of epoch %d failed: %s", step, redact(str(exc))
            )
            return
        self.logged_live.update((name, step) for name in points)

    def _run(self, parent: bool) -> str:
        return self.parent_id if parent else self.run_id

    def log_params(self, params: Mapping[str, Any], *, parent: bool = False) -> None:
        entries = [Param(k, redact(str(v))[:MAX_PARAM_VAL_LENGTH]) for k, v in params.items()]
        self.client.log_batch(self._run(parent), params=entries, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any], *, parent: bool = False) -> None:
        entries = [RunTag(key, value) for key, value in _tag_values(tags).items()]
        self.client.log_batch(self._run(parent), tags=entries, synchronous=True)

    def log_metrics(self, metrics: Mapping[str, float], *, parent: bool = False) -> None:
        self.log_series({key: [(0, value)] for key, value in metrics.items()}, parent=parent)

    def log_series(
        self, series: Mapping[str, Sequence[tuple[int, float]]], *, parent: bool = False
    ) -> None:
        """Log whole metric histories, `{name: [(step, value), ...]}`, in one `log_batch` call
        (MLflow chunks it): ~20x faster than one call per point."""
        now = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), now, int(step))
            for key, points in series.items()
            for step, value in points
            if parent or (key, int(step)) not in self.logged_live
        ]
        self.client.log_batch(self._run(parent), metrics=entries, synchronous=True)

    def log_dataset(self, source: str, fingerprint: str) -> None:
        """Record the prepared data as the parent run's dataset input (the UI's Dataset
        column), named after `source`, its digest the fingerprint's first 32 hex digits
        (MLflow's column holds 36 on PostgreSQL). Every stage logs it: a temp experiment
        whose fetch DVC skipped has it too."""
        import mlflow
        from mlflow.data.dataset_source_registry import resolve_dataset_source
        from mlflow.data.meta_dataset import MetaDataset

        source = redact(source)
        name = re.sub(r"(\.tar)?\.[A-Za-z0-9]+$", "", source.rstrip("/").rsplit("/", 1)[-1])
        with warnings.catch_warnings():
            # A local path "can be interpreted in multiple ways": MLflow registers its local
            # source type twice (schemes "" and "file"); either is the same.
            warnings.simplefilter("ignore", UserWarning)
            resolved = resolve_dataset_source(source)
        dataset = MetaDataset(resolved, name=name, digest=fingerprint[:32])
        mlflow.set_tracking_uri(self.store.uri)
        # The fluent API logs to an active run: the parent, resumed for this call only.
        with mlflow.start_run(run_id=self.parent_id):
            mlflow.log_input(dataset, context="training")

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        """Log a file or folder; a missing one is skipped."""
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_path)
        elif path.exists():
            self.client.log_artifact(self.run_id, str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the child run with `status`, and the parent with it: each stage closes the
        parent, which spans the whole pipeline, and the next stage reopens it."""
        if self._ended:
            return
        self._ended = True
        self.client.set_terminated(self.run_id, status=status)
        self.client.set_terminated(self.parent_id, status=status)

    def _end_if_open(self) -> None:
        # At interpreter shutdown the store may be gone too: nothing left to save then.
        with contextlib.suppress(Exception):
            self.end("FAILED")


def start_stage_run(
    client: MlflowClient,
    store: Store,
    params: Params,
    stage: str,
    *,
    environ: Mapping[str, str],
    root: Path,
    cwd: Path,
    tags: Mapping[str, str] | None,
) -> StageTracker:
    """Open `stage`'s child run under its pipeline execution's parent run, which the
    pipeline's first stage creates; both runs carry `tags` (device, precision)."""
    experiment_id = get_or_create_experiment(client, params.tracking.experiment, store)
    pipeline_key = pipeline_id(environ, os.getpid())
    quoted = pipeline_key.replace("'", "\\'")
    parents = client.search_runs(  # the first stage of this pipeline execution made it
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{quoted}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    parent_id = parents[0].info.run_id if parents else None
    exp_name = environ.get("DVC_EXP_NAME") or None
    commit, dirty = git_state(cwd)
    holder = process_tags()
    # The UI's Source column: the repo DVC ran in (never an experiment's temp copy, which
    # is deleted), the commit, and the remote it links to when there is one.
    common = {
        "visiontune.version": visiontune.__version__,
        **(tags or {}),
        "mlflow.source.type": "LOCAL",
        "mlflow.source.git.commit": commit,
        "mlflow.source.git.repoURL": git(root, "remote", "get-url", "origin") or None,
        PIPELINE_TAG: pipeline_key,
        **holder,
    }
    new_parent = parent_id is None
    if parent_id is None:
        parent_tags = {
            **common,
            ROLE_TAG: "pipeline",
            "mlflow.source.name": str(root),
            "git.commit": commit,
            "git.dirty": None if dirty is None else str(dirty).lower(),
            "dvc.exp_name": exp_name,
            "dvc.baseline_rev": environ.get("DVC_EXP_BASELINE_REV") or None,
            "backbone": params.model.backbone,
        }
        run_name = exp_name or time.strftime("pipeline %Y-%m-%d %H:%M:%S")
        parent_id = client.create_run(
            experiment_id, tags=_tag_values(parent_tags), run_name=run_name
        ).info.run_id
    else:
        # This stage holds the parent open now: if it is killed, its runs are closed.
        client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in holder.items()])
        client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
    child_tags = {
        **common,
        ROLE_TAG: "stage",
        "mlflow.parentRunId": parent_id,
        "mlflow.source.name": f"{root}/stages/{stage}.py",
        "visiontune.stage": stage,
    }
    child = client.create_run(experiment_id, tags=_tag_values(child_tags), run_name=stage)
    tracker = StageTracker(
        stage=stage,
        client=client,
        store=store,
        exp_name=exp_name,
        parent_id=parent_id,
        run_id=child.info.run_id,
    )
    if new_parent:
        tracker.log_params(flatten(params), parent=True)
    return tracker
