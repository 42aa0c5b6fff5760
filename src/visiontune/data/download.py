"""Download a dataset archive over http(s): streamed, retried, checked, cached. The body is
renamed into the cache only once whole and matching `sha256`: a cached file is never partial."""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path
from urllib.parse import unquote, urlparse

import requests
from tqdm import tqdm

from visiontune.fileio import atomic_path, sha256_file

# Worth another try: the server or the network may do better in a moment.
_RETRY_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})


class DownloadError(OSError):
    """A download that failed for good (after retries, or on a checksum mismatch)."""


class _Retryable(Exception):
    """A failure worth another attempt."""


def is_url(source: str) -> bool:
    return urlparse(source).scheme in ("http", "https")


def cache_name(url: str) -> str:
    """A file name for `url` in the download cache: its basename plus a short URL hash."""
    path = urlparse(url).path
    base = re.sub(r"[^A-Za-z0-9._-]", "_", unquote(path.rsplit("/", 1)[-1])) or "download"
    digest = hashlib.sha256(url.encode("utf-8")).hexdigest()[:10]
    for suffix in (".tar.gz", ".tar.bz2", ".tar.xz"):
        if base.lower().endswith(suffix):
            return f"{base[: -len(suffix)]}-{digest}{base[-len(suffix) :]}"
    stem, dot, ext = base.rpartition(".")
    return f"{stem}-{digest}.{ext}" if dot and stem else f"{base}-{digest}"


def download(
    url: str,
    dest: Path,
    *,
    sha256: str | None = None,
    retries: int = 3,
    timeout_s: float = 60.0,
    backoff_s: float = 1.0,
    progress: bool = True,
) -> Path:
    """Fetch `url` to `dest`, reusing `dest` when it is already there (and matches `sha256`).

    Connection errors, timeouts, truncated bodies and HTTP 408/429/5xx are retried `retries`
    times with exponential backoff (`backoff_s`, then twice that, ...); DownloadError when
    the download fails for good, or its SHA-256 is not `sha256`.
    """
    if dest.is_file():
        if sha256 is None or sha256_file(dest) == sha256:
            return dest
        print(f"cached {dest} does not match sha256 {sha256}; downloading again")
    for attempt in range(retries + 1):
        try:
            _fetch_once(url, dest, sha256, timeout_s, progress)
            break
        except _Retryable as exc:
            if attempt == retries:
                raise DownloadError(
                    f"{url}: download failed after {retries + 1} attempt(s): {exc}"
                ) from None
            wait = backoff_s * 2**attempt
            print(f"{url}: {exc}; retrying in {wait:.1f}s ({attempt + 1}/{retries})")
            time.sleep(wait)
    return dest


def _fetch_once(url: str, dest: Path, sha256: str | None, timeout_s: float, progress: bool) -> None:
    digest = hashlib.sha256()
    try:
        with requests.get(url, stream=True, timeout=timeout_s) as response:
            if response.status_code in _RETRY_STATUS:
                raise _Retryable(f"HTTP {response.status_code} {response.reason}")
            if response.status_code >= 400:
                raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}")
            expected = int(response.headers.get("Content-Length") or 0) or None
            bar = tqdm(
                total=expected, unit="B", unit_scale=True, desc=dest.name, disable=not progress
            )
            # An error inside atomic_path leaves no file behind.
            with bar, atomic_path(dest) as tmp, open(tmp, "wb") as handle:
                for chunk in response.iter_content(1 << 20):
                    handle.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                if expected is not None and handle.tell() != expected:
                    raise _Retryable(f"connection closed after {handle.tell()} of {expected} bytes")
                if sha256 is not None and digest.hexdigest() != sha256:
                    raise DownloadError(
                        f"{url}: sha256 mismatch: expected {sha256}, got {digest.hexdigest()} "
                        "(the file was not kept; check data.sha256 or the URL)"
                    )
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise _Retryable(f"{type(exc).__name__}: {exc}") from None
    except requests.exceptions.ChunkedEncodingError as exc:
        raise _Retryable(f"truncated response: {exc}") from None
    except requests.RequestException as exc:
        raise DownloadError(f"{url}: {exc}") from None
