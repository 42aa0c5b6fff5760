"""Shared fixtures: the real sample photos in ../shared/data and a shrunken real config.

Tests build config from the repo's params.yaml, never from code defaults (there are none):
`real_config.default_params()` / `default_section(HeadParams, epochs=2)`, or the
`default_params` fixture.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from real_config import default_params as _default_params

from visiontune.config import Params

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"
# The MLflow servers the tests start (`mlflow server`, `make ui`) need no job runner: its
# three consumer processes cost CPU the tests share (the Makefile's `ui` sets it too).
os.environ.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one worker per core: one compute thread each (and in the stages they
    # start), as OpenMP threads that outnumber the cores stall at every barrier.
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def _test_tracking_store(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow')}/mlflow.db"


@pytest.fixture(autouse=True)
def _isolated_tracking(_test_tracking_store: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stages run in-process log to a throwaway store, never to the repo's mlflow.db."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _test_tracking_store)


@pytest.fixture(scope="session")
def default_params() -> Params:
    """The repo's params.yaml, validated (shrink it with `.model_copy(update=...)`)."""
    return _default_params()


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not (SHARED_DATA / "dogscats").is_dir():
        pytest.skip(f"sample photos not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def dogscats(shared_data: Path) -> Path:
    return shared_data / "dogscats"


@pytest.fixture(scope="session")
def dogbreeds(shared_data: Path) -> Path:
    return shared_data / "dogbreeds"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Files with slow tests first: `make test` hands whole files to two workers in this
    order, so the long end-to-end files start at once instead of last, beside an idle
    worker."""
    slow_files = {item.path for item in items if item.get_closest_marker("slow")}
    # The walkthrough is one chain of a few minutes: it starts first, the rest fill the
    # other worker. Stable sort: file order is kept otherwise.
    items.sort(
        key=lambda item: (item.path.name != "test_walkthrough.py", item.path not in slow_files)
    )
