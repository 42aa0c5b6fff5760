"""Datasets in, checked images and split tables out: sources, safe image loading, manifests.

Submodules: `images` (inspect/open any image safely), `manifest` (the CSV/JSON tables
between stages), `sources` (folder, CSV, archive, URL → manifest), `split` (train/valid).
Import them directly; this package imports nothing heavy (no torch) so `fetch` stays light.
"""

from visiontune.data.images import UnreadableImageError, inspect_image, open_rgb
from visiontune.data.manifest import read_classes, read_manifest, read_split

__all__ = [
    "UnreadableImageError",
    "inspect_image",
    "open_rgb",
    "read_classes",
    "read_manifest",
    "read_split",
]
