"""Image access for records: a header-level check before training, full decoding when an item is loaded.

`probe_image` opens a file and reads its size from the header without decoding pixels (fast enough to
check millions of images before training); `load_image` decodes to RGB. Both raise an error naming the
file, the data file and the record: `MissingImageError` when the file does not exist,
`UnreadableImageError` when PIL cannot open it (or, for `load_image`, cannot decode it: a file whose
header is fine but whose pixel data is corrupt passes `probe_image` and fails in `load_image`).
"""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

from llava.data.errors import MissingImageError, UnreadableImageError

PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def _require_file(path: str, record_id: str, source: str) -> None:
    if not os.path.isfile(path):
        raise MissingImageError(source, record_id, f"image file not found: {path}")


def probe_image(path: str, record_id: str, source: str) -> tuple[int, int]:
    """(height, width) of `path` from its header; pixels are not decoded."""
    _require_file(path, record_id, source)
    try:
        with Image.open(path) as image:
            width, height = image.size
    except PIL_ERRORS as error:
        raise UnreadableImageError(source, record_id, f"cannot open image {path}: {error}") from error
    return height, width


def load_image(path: str, record_id: str, source: str) -> Image.Image:
    """Open `path` fully and convert it to RGB (see the module docstring for the errors)."""
    _require_file(path, record_id, source)
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except PIL_ERRORS as error:
        raise UnreadableImageError(source, record_id, f"cannot decode image {path}: {error}") from error
