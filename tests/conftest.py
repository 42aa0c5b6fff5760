"""Shared fixtures: the real sample photos in ../shared/data and a shrunken real config."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


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
