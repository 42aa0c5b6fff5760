"""Builders for the data tests: tiny real image files of every awkward kind, made at test time,
and a real local HTTP server for URL sources."""

from __future__ import annotations

import io
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image


def photo(width: int = 48, height: int = 32, seed: int = 0) -> Image.Image:
    """A small RGB image with content (a gradient plus noise), distinct per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([x * 255 // max(width, 1), y * 255 // max(height, 1), (x + y) % 256], -1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))


def write_jpeg(path: Path, seed: int = 0, size: tuple[int, int] = (48, 32), **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    photo(*size, seed=seed).save(path, "JPEG", quality=90, **kwargs)
    return path


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (48, 32)) -> bytes:
    buffer = io.BytesIO()
    photo(*size, seed=seed).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


NastyWriter = Callable[[Path], None]


def _truncated(path: Path) -> None:
    data = jpeg_bytes(seed=7, size=(64, 64))
    path.write_bytes(data[: len(data) // 2])


def _png_alpha(path: Path) -> None:
    rgba = photo(seed=8).convert("RGBA")
    rgba.putalpha(Image.new("L", rgba.size, 0))  # fully transparent
    rgba.save(path, "PNG")


def _palette_gif(path: Path) -> None:
    photo(seed=9).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(path, "GIF")


def _animated_gif(path: Path) -> None:
    frames = [photo(seed=10 + i).convert("P") for i in range(3)]
    frames[0].save(path, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _cmyk_jpeg(path: Path) -> None:
    photo(seed=13).convert("CMYK").save(path, "JPEG")


def _png16(path: Path) -> None:
    ramp = (np.arange(32 * 48).reshape(32, 48) * 40).astype(np.uint16)
    Image.fromarray(ramp).save(path, "PNG")


def _large_jpeg(path: Path) -> None:
    photo(60, 40, seed=16).resize((3000, 2000), Image.Resampling.NEAREST).save(path, "JPEG")


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    photo(60, 20, seed=14).save(path, "JPEG", exif=exif.tobytes())


# name → (writer, expected outcome: None = accepted, else a substring of the reason)
NASTY: dict[str, tuple[NastyWriter, str | None]] = {
    "zero bytes.jpg": (lambda p: p.write_bytes(b""), "empty file"),
    "truncated.jpg": (_truncated, "truncated"),
    "text.jpg": (lambda p: p.write_text("not a picture\n"), "not an image"),
    "alpha.png": (_png_alpha, None),
    "palette.gif": (_palette_gif, None),
    "animated.gif": (_animated_gif, None),
    "cmyk.jpg": (_cmyk_jpeg, None),
    "sixteen_bit.png": (_png16, None),
    "one_pixel.png": (lambda p: photo(1, 1, seed=15).save(p, "PNG"), None),
    "large.jpg": (_large_jpeg, None),
    "bomb.png": (lambda p: Image.new("L", (4000, 2500)).save(p, "PNG"), "too many pixels"),
    "exif_rotated.jpg": (_exif_rotated, None),
    "grayscale.png": (lambda p: photo(seed=18).convert("L").save(p, "PNG"), None),
    "çà et là – ünïcode.jpg": (lambda p: write_jpeg(p, seed=19), None),
    "with space.webp": (lambda p: photo(seed=20).save(p, "WEBP"), None),
}
# Small enough that bomb.png (10 MP) is refused, large enough for large.jpg (6 MP).
NASTY_MAX_PIXELS = 8_000_000


PAYLOAD = bytes(range(256)) * 4096  # 1 MiB


class Server:
    """Serves `payload` at /data.zip on 127.0.0.1; `failures` scripts the next requests
    ("404", "503", "truncate": a body cut short of its Content-Length)."""

    def __init__(self) -> None:
        self.requests = 0
        self.failures: list[str] = []
        self.payload = PAYLOAD
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep pytest output clean
                pass

            def do_GET(self) -> None:
                server.requests += 1
                failure = server.failures.pop(0) if server.failures else None
                if self.path != "/data.zip" or failure == "404":
                    self.send_error(404)
                elif failure == "503":
                    self.send_error(503)
                else:
                    body = server.payload
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 3] if failure == "truncate" else body)
                    self.close_connection = failure == "truncate"

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/data.zip"
