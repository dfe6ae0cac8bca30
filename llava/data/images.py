"""Image access for records: a header-level check before training, full decoding when an item is loaded.

`probe_image` opens a file and reads its size from the header without decoding pixels (fast enough to
check millions of images before training); `load_image` decodes to RGB. Both raise an error naming the
file, the data file and the record: `MissingImageError` when the file does not exist,
`UnreadableImageError` when PIL cannot open it (or, for `load_image`, cannot decode it: a file whose
header is fine but whose pixel data is corrupt passes `probe_image` and fails in `load_image`).
An image embedded in a data table (`data` given: its encoded bytes) is read from memory instead;
`path` is then only its label in error messages. A truncated file is refused even when something in the
process has set PIL's global `ImageFile.LOAD_TRUNCATED_IMAGES` (lmms-eval sets it when it is imported),
which would otherwise decode the missing pixels as black without a word.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from contextlib import contextmanager

from PIL import Image, ImageFile, UnidentifiedImageError

from llava.data.errors import MissingImageError, UnreadableImageError

PIL_ERRORS = (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def _require_file(path: str, record_id: str, source: str) -> None:
    if not os.path.isfile(path):
        raise MissingImageError(source, record_id, f"image file not found: {path}")


def _open(path: str, data: bytes | None) -> Image.Image:
    return Image.open(path if data is None else io.BytesIO(data))


def probe_image(path: str, record_id: str, source: str, data: bytes | None = None) -> tuple[int, int]:
    """(height, width) of `path` (or of the encoded `data`) from its header; pixels are not decoded."""
    if data is None:
        _require_file(path, record_id, source)
    try:
        with _open(path, data) as image:
            width, height = image.size
    except PIL_ERRORS as error:
        raise UnreadableImageError(source, record_id, f"cannot open image {path}: {error}") from error
    return height, width


@contextmanager
def _truncated_images_refused() -> Iterator[None]:
    saved, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, False
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = saved


def load_image(path: str, record_id: str, source: str, data: bytes | None = None) -> Image.Image:
    """Open `path` (or the encoded `data`) fully and convert it to RGB (see the module docstring)."""
    if data is None:
        _require_file(path, record_id, source)
    try:
        with _truncated_images_refused(), _open(path, data) as image:
            return image.convert("RGB")
    except PIL_ERRORS as error:
        raise UnreadableImageError(source, record_id, f"cannot decode image {path}: {error}") from error
