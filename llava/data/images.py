"""Image loading for records: decode to RGB or raise an error naming the file and the record."""

from __future__ import annotations

import os

from PIL import Image, UnidentifiedImageError

from llava.data.errors import MissingImageError, UnreadableImageError


def load_image(path: str, record_id: str, source: str) -> Image.Image:
    """Open `path` fully and convert it to RGB.

    Raises `MissingImageError` when the file does not exist and `UnreadableImageError` when PIL cannot
    decode it (not an image, truncated, unsupported format); both name `source` (the data file) and the id.
    """
    if not os.path.isfile(path):
        raise MissingImageError(source, record_id, f"image file not found: {path}")
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(source, record_id, f"cannot decode image {path}: {error}") from error
