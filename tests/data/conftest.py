"""Fixtures for the data tests (the builders live in datagen.py)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from datagen import NASTY, NASTY_MAX_PIXELS, Server, photo, write_jpeg
from PIL import Image


@pytest.fixture(scope="session")
def nasty_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One folder holding every nasty file of NASTY (made once; tests must not modify it)."""
    folder = tmp_path_factory.mktemp("nasty")
    for name, (writer, _) in NASTY.items():
        writer(folder / name)
    return folder


@pytest.fixture
def nasty_expected() -> dict[str, str | None]:
    """File name in `nasty_dir` → None (must be accepted) or a substring of its reject reason."""
    return {name: expected for name, (_, expected) in NASTY.items()}


@pytest.fixture
def nasty_max_pixels() -> int:
    return NASTY_MAX_PIXELS


@pytest.fixture
def make_jpeg() -> Callable[..., Path]:
    """`make_jpeg(path, seed=0, size=(48, 32))`: write a small distinct JPEG."""
    return write_jpeg


@pytest.fixture
def make_photo() -> Callable[..., Image.Image]:
    return photo


@pytest.fixture
def server() -> Iterator[Server]:
    """A real HTTP server in a thread, for URL sources."""
    instance = Server()
    thread = threading.Thread(
        target=instance.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    yield instance
    instance.httpd.shutdown()
    instance.httpd.server_close()
