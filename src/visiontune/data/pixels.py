"""Images on disk → uint8 3×H×W tensors, what the loaders and the TTA views start from.

A JPEG that Pillow's draft mode would not shrink (the photo is less than twice the size
the transform needs) goes from its bytes straight into a tensor with TorchCodec's
libjpeg-turbo decoder (which took over from torchvision's, deprecated since 0.29), EXIF
orientation applied. The pixels are Pillow's to the last bit (all 4000 photos of
dogscats and dogbreeds, 3979 of them decoded this way; every EXIF orientation, grayscale,
progressive and 4:4:4 in the tests), and the photo skips Pillow's image object and its
copy into a tensor: with the eval resize and crop, 1.72-1.94 → 1.25-1.35 ms per dogscats
photo (1 core); a 2-worker loader alone, 704-885 → 949-1064 images/s.

Everything else goes through `open_rgb`: other formats, CMYK JPEGs (Adobe's inverted
variants are Pillow's business), photos large enough for a reduced decode, and any file
TorchCodec rejects, so its checks and error messages stay the only ones. Without
TorchCodec installed (a lent GPU machine has torch but not it) every image goes through
`open_rgb`: the same pixels, only slower.

`decode_pixels` does the same for bytes in memory, so a served model decodes a posted
photo exactly as `visiontune predict` decodes the file.
"""

from __future__ import annotations

import io
from pathlib import Path

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as F

from visiontune.data.images import decode_rgb, open_rgb

try:
    from torchcodec.decoders import decode_jpeg
except ImportError:  # not installed: open_rgb decodes everything (same pixels)
    decode_jpeg = None

# JPEG colour models TorchCodec's RGB decode handles as Pillow does.
_DIRECT_MODES = frozenset({"RGB", "L"})


def open_pixels(path: str | Path, min_size: int | None = None) -> torch.Tensor:
    """Decode an image as upright 8-bit RGB pixels, uint8 3×H×W.

    Args:
        path: the image file.
        min_size: as in `open_rgb`: a JPEG whose short side is at least twice this is
            decoded at the largest DCT reduction that keeps it >= `min_size`.

    Raises:
        UnreadableImageError: the file is missing, not an image, or corrupt (from
            `open_rgb`, with its reasons).
    """
    path = Path(path)
    data = _direct_jpeg_bytes(path, min_size)
    if data is not None:
        try:
            return decode_jpeg(data, mode="RGB")  # applies the EXIF orientation
        except RuntimeError:
            pass  # corrupt or unusual: open_rgb decides, and says why if it cannot
    return F.pil_to_tensor(open_rgb(path, min_size=min_size))


def decode_pixels(data: bytes, min_size: int | None = None, name: str = "<bytes>") -> torch.Tensor:
    """`open_pixels` for an encoded image in memory: the same decoder choice, the same pixels.

    Raises:
        UnreadableImageError: empty, not an image, or corrupt (`name` labels the message).
    """
    if decode_jpeg is not None:
        try:
            direct = _is_direct_jpeg(io.BytesIO(data), min_size)
        except Exception:  # not an image: decode_rgb reports it
            direct = False
        if direct:
            try:
                return decode_jpeg(data, mode="RGB")
            except RuntimeError:
                pass
    return F.pil_to_tensor(decode_rgb(data, min_size=min_size, name=name))


def _is_direct_jpeg(file: io.BufferedIOBase | io.BytesIO, min_size: int | None) -> bool:
    """Whether TorchCodec decodes this JPEG as Pillow would (reads the header only)."""
    with Image.open(file) as img:
        if img.format != "JPEG" or img.mode not in _DIRECT_MODES:
            return False
        if min_size is not None:
            size = img.size
            img.draft("RGB", (min_size, min_size))
            if img.size != size:  # a reduced decode is Pillow's (several times faster)
                return False
    return True


def _direct_jpeg_bytes(path: Path, min_size: int | None) -> bytes | None:
    """The file's bytes when TorchCodec may decode it, else None (open_rgb's case).

    Only the header is read to decide, so a file left to open_rgb is not read twice.
    """
    if decode_jpeg is None:
        return None
    try:
        with open(path, "rb") as file:
            if not _is_direct_jpeg(file, min_size):
                return None
            file.seek(0)
            return file.read()
    except Exception:  # missing, unreadable, not an image: open_rgb reports it
        return None
