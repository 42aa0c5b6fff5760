"""Safe image checking and loading, every photo's way to a model: `inspect_image` says at fetch
time why a file is unusable; `open_rgb` turns a file or its bytes into upright 8-bit RGB."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

# File name suffixes treated as images when scanning a source (case-insensitive).
IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff"}
)


class UnreadableImageError(ValueError):
    """An image file that cannot be decoded; `reason` is the human-readable cause."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


def is_image_name(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_SUFFIXES


def inspect_image(
    source: Path | bytes, max_pixels: int | None = None, name: str = "<bytes>"
) -> str | None:
    """None when `open_rgb` opens a file (a path, or its bytes) with `max_pixels`, else why not."""
    try:
        open_rgb(source, max_pixels=max_pixels, name=name)
    except UnreadableImageError as exc:
        return exc.reason
    return None


def open_rgb(
    source: str | Path | bytes,
    min_size: int | None = None,
    *,
    max_pixels: int | None = None,
    name: str = "<bytes>",
) -> Image.Image:
    """Open an image file, or its encoded bytes (`name` labels them), as upright 8-bit RGB.

    The whole first frame is decoded (truncated JPEGs show). `min_size`: a JPEG is decoded
    at the largest DCT reduction (1/2, 1/4, 1/8) that keeps its short side >= `min_size`,
    several times faster for a large photo. `max_pixels`: the header's size is held against
    it before any pixel is decoded (decompression bombs).

    Raises:
        UnreadableImageError: the file is missing, not an image, or corrupt.
    """
    path = name if isinstance(source, bytes) else source
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        if not data:
            raise UnreadableImageError(path, "empty file (0 bytes)")
        with Image.open(io.BytesIO(data)) as img:
            width, height = img.size
            if max_pixels is not None and width * height > max_pixels:
                raise UnreadableImageError(
                    path,
                    f"too many pixels: {width}x{height} = {width * height} > "
                    f"max_image_pixels {max_pixels} (possible decompression bomb)",
                )
            if min_size is not None and img.format == "JPEG":
                img.draft("RGB", (min_size, min_size))
            img.load()  # decodes the whole (first) frame: truncation shows up here
            return _to_rgb(ImageOps.exif_transpose(img))
    except UnreadableImageError:
        raise
    except FileNotFoundError:
        raise UnreadableImageError(path, "file not found") from None
    except IsADirectoryError:
        raise UnreadableImageError(path, "is a directory, not a file") from None
    except UnidentifiedImageError:
        raise UnreadableImageError(path, "not an image (format not recognised)") from None
    except Image.DecompressionBombError as exc:
        raise UnreadableImageError(path, f"decompression bomb: {exc}") from None
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError) as exc:
        # Pillow reports truncated and corrupt data as OSError/SyntaxError/ValueError.
        message = str(exc) or type(exc).__name__
        raise UnreadableImageError(path, f"corrupt or truncated image data: {message}") from None


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "P":
        has_alpha = "transparency" in img.info or img.palette.mode == "RGBA"
        img = img.convert("RGBA" if has_alpha else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # On white, not black: photos and clip-art with alpha are drawn on white far more often.
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img.convert("RGBA")).convert("RGB")
    if not (img.mode.startswith("I") or img.mode == "F"):
        return img if img.mode == "RGB" else img.convert("RGB")  # L, 1, CMYK, YCbCr, LAB, HSV
    # Pillow's own convert clips 16-bit values at 255 (a white image); rescale instead.
    array = np.asarray(img).astype(np.float64)
    if img.mode == "F":
        low, high = float(array.min()), float(array.max())
        array = (array - low) / (high - low) * 255.0 if high > low else np.zeros_like(array)
    elif array.max() > 255:
        array = array / 257.0  # 0..65535 → 0..255
    return Image.fromarray(np.clip(np.rint(array), 0, 255).astype(np.uint8)).convert("RGB")
