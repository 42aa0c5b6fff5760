"""MLflow runs for one pipeline execution: a parent run found by tag, one child per stage.

Everything goes through an explicit `MlflowClient` (no global fluent state), and series are
sent with `log_batch` in chunks, which is ~20x faster than one call per point. Each run
records the host and process that holds it open, so that a later stage can close the runs
of a stage that was killed (`close_orphaned_runs`).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.validation import MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH

from visiontune.tracking.collect import epoch_metric_name
from visiontune.tracking.orphans import process_tags
from visiontune.tracking.store import Store, TrackingError, redact

PIPELINE_TAG = "visiontune.pipeline_id"
ROLE_TAG = "visiontune.role"
STAGE_TAG = "visiontune.stage"
PARENT_TAG = "mlflow.parentRunId"
# MLflow 3's UI opens an experiment of this kind on its runs, not on the GenAI overview.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
# MLflow rejects longer param values.
_MAX_PARAM_CHARS = 6000


def quiet_mlflow_logging(environ: Mapping[str, str] = os.environ) -> None:
    """Keep MLflow's warnings and errors, not its INFO lines, unless MLFLOW_LOGGING_LEVEL is set.

    mlflow sets its logger to INFO when imported, so a new SQLite store printed "Creating
    initial MLflow database tables..." and "Updating database tables" into the stage's
    output. mlflow already holds alembic and SQLAlchemy at WARNING; only its own logger is
    raised here, never the root logger.
    """
    if not environ.get("MLFLOW_LOGGING_LEVEL"):
        logging.getLogger("mlflow").setLevel(logging.WARNING)


def _chunks(items: Sequence[Any], size: int) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def get_or_create_experiment(client: MlflowClient, name: str, store: Store) -> str:
    """The id of experiment `name`, created (with the store's artifact location) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(
                name, artifact_location=store.artifact_location, tags=EXPERIMENT_KIND
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
    for key, value in EXPERIMENT_KIND.items():
        if experiment.tags.get(key) is None:  # made by an older visiontune
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def find_parent_run(client: MlflowClient, experiment_id: str, pipeline_key: str) -> str | None:
    """The parent run of pipeline execution `pipeline_key`, if a stage already created it."""
    quoted = pipeline_key.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{PIPELINE_TAG}` = '{quoted}' and tags.`{ROLE_TAG}` = 'pipeline'",
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


class StageTracker:
    """Logging handle of one stage: its child run and the pipeline's parent run.

    Only an open run has one: a stage that logs nothing holds `tracking.NoTracking`.
    """

    enabled = True

    def __init__(
        self,
        stage: str,
        *,
        required: bool,
        client: MlflowClient,
        store: Store,
        exp_name: str | None,
        experiment_id: str,
        parent_id: str,
        run_id: str,
    ) -> None:
        self.stage = stage
        self.required = required
        self.client = client
        self.store = store
        # The DVC experiment this stage runs in (None: a workspace `dvc repro`).
        self.exp_name = exp_name
        self.experiment_id = experiment_id
        self.parent_id = parent_id
        self.run_id = run_id
        # (metric, step) points already sent while the stage ran (`log_epoch`).
        self.logged_live: set[tuple[str, int]] = set()
        self._ended = False
        # A stage that raises between opening its run and logging it must not leave its
        # runs RUNNING; a killed one is closed by the next stage's start instead.
        atexit.register(self._end_if_open)

    def log_epoch(self, row: Mapping[str, Any]) -> None:
        """Log one epoch's history row now, for people watching the run in the UI.

        The same points come back from history.csv when the stage is logged: those sent
        here are not sent twice. A store that fails mid-run only warns: the stage's own
        logging at the end decides the exit code.
        """
        if "epoch" not in row:
            return
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

    def _target(self, parent: bool) -> str:
        run_id = self.parent_id if parent else self.run_id
        assert run_id is not None
        return run_id

    def log_params(self, params: Mapping[str, Any], *, parent: bool = False) -> None:
        if not params:
            return
        for chunk in _chunks(_param_entries(params), MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._target(parent), params=chunk, synchronous=True)

    def set_tags(self, tags: Mapping[str, Any], *, parent: bool = False) -> None:
        if not tags:
            return
        entries = [
            RunTag(key, redact(str(value))) for key, value in tags.items() if value is not None
        ]
        for chunk in _chunks(entries, MAX_PARAMS_TAGS_PER_BATCH):
            self.client.log_batch(self._target(parent), tags=chunk, synchronous=True)

    def log_metrics(
        self, metrics: Mapping[str, float], *, step: int = 0, parent: bool = False
    ) -> None:
        """Log scalar metrics (non-numbers are skipped) at one step."""
        self.log_series({key: [(step, value)] for key, value in metrics.items()}, parent=parent)

    def log_series(
        self, series: Mapping[str, Sequence[tuple[int, float]]], *, parent: bool = False
    ) -> None:
        """Log whole metric histories, `{name: [(step, value), ...]}`, in batches."""
        now = int(time.time() * 1000)
        entries = [
            Metric(key, float(value), now, int(step))
            for key, points in series.items()
            for step, value in points
            if _is_number(value) and (parent or (key, int(step)) not in self.logged_live)
        ]
        for chunk in _chunks(entries, MAX_METRICS_PER_BATCH):
            self.client.log_batch(self._target(parent), metrics=chunk, synchronous=True)

    def log_dataset(self, source: str, fingerprint: str) -> None:
        """Record the prepared data as the parent run's dataset input (the UI's Dataset
        column): named after `source`, its digest the first 32 hex digits of `fingerprint`
        (MLflow's digest column holds 36 characters on PostgreSQL); the whole fingerprint
        is the `data.fingerprint` tag. MLflow keeps one input per dataset and run, so every
        stage logs it: a temp experiment whose fetch DVC skipped has it too."""
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
        with mlflow.start_run(run_id=self._target(True)):
            mlflow.log_input(dataset, context="training")
        self.set_tags({"data.fingerprint": fingerprint}, parent=True)

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        if Path(path).exists():
            if Path(path).is_dir():
                self.client.log_artifacts(self._target(False), str(path), artifact_path)
            else:
                self.client.log_artifact(self._target(False), str(path), artifact_path)

    def end(self, status: str = "FINISHED") -> None:
        """Close the child run with `status` and mark the parent as finished so far."""
        if self._ended:
            return
        self._ended = True
        self.client.set_terminated(self._target(False), status=status)
        # The parent spans the whole pipeline: each stage closes it, the next reopens it.
        parent_status = "FINISHED" if status == "FINISHED" else status
        self.client.set_terminated(self._target(True), status=parent_status)

    def _end_if_open(self) -> None:
        if not self._ended:
            # At interpreter shutdown the store may be gone too: nothing left to save then.
            with contextlib.suppress(Exception):
                self.end("FAILED")


def _is_number(value: Any) -> bool:
    if isinstance(value, bool | str) or value is None:
        return False
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True


def _param_entries(params: Mapping[str, Any]) -> list[Param]:
    return [Param(key, redact(str(value))[:_MAX_PARAM_CHARS]) for key, value in params.items()]


def start_stage_run(
    client: MlflowClient,
    store: Store,
    *,
    experiment: str,
    stage: str,
    pipeline_key: str,
    required: bool,
    parent_params: Mapping[str, Any],
    parent_tags: Mapping[str, Any],
    run_tags: Mapping[str, Any],
) -> StageTracker:
    """Open `stage`'s child run under the parent of `pipeline_key` (creating the parent)."""
    experiment_id = get_or_create_experiment(client, experiment, store)
    parent_id = find_parent_run(client, experiment_id, pipeline_key)
    holder = process_tags()
    if parent_id is None:
        tags = {PIPELINE_TAG: pipeline_key, ROLE_TAG: "pipeline", **parent_tags, **holder}
        run_name = (
            parent_tags.get("dvc.exp_name") or f"pipeline {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        parent = client.create_run(
            experiment_id,
            tags={k: redact(str(v)) for k, v in tags.items() if v is not None},
            run_name=str(run_name),
        )
        parent_id = parent.info.run_id
        for chunk in _chunks(_param_entries(parent_params), MAX_PARAMS_TAGS_PER_BATCH):
            client.log_batch(parent_id, params=chunk, synchronous=True)
    else:
        # This stage holds the parent open now: if it is killed, its runs are closed.
        client.log_batch(parent_id, tags=[RunTag(k, v) for k, v in holder.items()])
        client.update_run(parent_id, status=RunStatus.to_string(RunStatus.RUNNING))
    child_tags = {
        PARENT_TAG: parent_id,
        PIPELINE_TAG: pipeline_key,
        ROLE_TAG: "stage",
        STAGE_TAG: stage,
        **run_tags,
        **holder,
    }
    child = client.create_run(
        experiment_id,
        tags={k: redact(str(v)) for k, v in child_tags.items() if v is not None},
        run_name=stage,
    )
    return StageTracker(
        stage,
        required=required,
        client=client,
        store=store,
        exp_name=parent_tags.get("dvc.exp_name"),
        experiment_id=experiment_id,
        parent_id=parent_id,
        run_id=child.info.run_id,
    )
