"""URL downloads against a real local HTTP server: caching, retries, checksum, failures."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from datagen import PAYLOAD, Server

from visiontune.data.download import DownloadError, cache_name, download


def _get(server: Server, dest: Path, **kwargs) -> Path:
    kwargs.setdefault("backoff_s", 0.01)
    return download(server.url, dest, progress=False, timeout_s=5, **kwargs)


def test_download_then_reuse_the_cached_file(server: Server, tmp_path: Path) -> None:
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    dest = _get(server, tmp_path / "cache" / "data.zip", sha256=digest)
    assert dest.read_bytes() == PAYLOAD and server.requests == 1
    _get(server, dest, sha256=digest)
    _get(server, dest)
    assert server.requests == 1, "a cached, matching file is not fetched again"
    assert [p.name for p in dest.parent.iterdir()] == ["data.zip"], "no temp files left"


def test_retries_after_a_server_error_and_a_truncated_body(server: Server, tmp_path: Path) -> None:
    server.failures = ["503", "truncate"]
    dest = _get(server, tmp_path / "data.zip", retries=2)
    assert dest.read_bytes() == PAYLOAD
    assert server.requests == 3


def test_gives_up_after_the_retries(server: Server, tmp_path: Path) -> None:
    server.failures = ["503"] * 3
    with pytest.raises(DownloadError, match="after 2 attempt"):
        _get(server, tmp_path / "data.zip", retries=1)
    assert server.requests == 2 and not (tmp_path / "data.zip").exists()


def test_client_errors_are_not_retried(server: Server, tmp_path: Path) -> None:
    server.failures = ["404"]
    with pytest.raises(DownloadError, match="404"):
        _get(server, tmp_path / "data.zip", retries=3)
    assert server.requests == 1


def test_sha256_mismatch_keeps_no_file_and_a_stale_cache_is_refetched(
    server: Server, tmp_path: Path
) -> None:
    dest = tmp_path / "data.zip"
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        _get(server, dest, sha256="0" * 64)
    assert not dest.exists() and list(tmp_path.iterdir()) == []

    dest.write_bytes(b"an old, different file")
    _get(server, dest, sha256=hashlib.sha256(PAYLOAD).hexdigest())
    assert dest.read_bytes() == PAYLOAD and server.requests == 2


def test_unreachable_server_fails_with_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="after 1 attempt"):
        download("http://127.0.0.1:9/data.zip", tmp_path / "x.zip", retries=0, progress=False)


def test_cache_names_keep_the_suffix_and_differ_per_url() -> None:
    a = cache_name("https://example.org/a/cats_and_dogs.tar.gz?x=1")
    b = cache_name("https://example.org/b/cats_and_dogs.tar.gz")
    assert a.startswith("cats_and_dogs-") and a.endswith(".tar.gz") and a != b
    assert cache_name("https://example.org/dl/Data%20Set.zip").endswith(".zip")
    assert "/" not in cache_name("https://example.org/")
