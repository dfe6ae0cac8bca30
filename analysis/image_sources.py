"""Image sources for feature extraction: images (and optional integer labels) addressed by position,
each with a stable identity that keys the feature cache (analysis/features.py).

Sources: explicit file lists, ImageFolder trees (`root/<class>/<image>`), `datasets.save_to_disk`
directories and in-memory arrays. `square_crop` asks for the largest centred square crop (the
segmentation-probe preprocessing of patch-seg, `LargestCenterCrop`).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of `obj`."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def array_digest(array: np.ndarray) -> str:
    array = np.ascontiguousarray(array)
    return hashlib.sha256(str((array.shape, array.dtype.str)).encode() + array.tobytes()).hexdigest()


@dataclass(frozen=True)
class ImageSource:
    """Images (and optional integer labels) addressed by position, with a stable identity for the cache.

    `square_crop` asks for the largest centred square crop, resized by the extractor to the encoder's input
    size (the segmentation-probe preprocessing; masks get the same crop with nearest resizing).
    """

    name: str
    key: str
    load_item: Callable[[int], Image.Image]
    indices: np.ndarray
    labels: np.ndarray | None = None
    class_names: list[str] | None = None
    square_crop: bool = False

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, position: int) -> Image.Image:
        return self.load_item(int(self.indices[position]))

    def identity(self) -> str:
        return stable_hash([self.key, self.square_crop, array_digest(self.indices)])

    def subset(self, positions: np.ndarray) -> ImageSource:
        positions = np.asarray(positions, dtype=np.int64)
        labels = None if self.labels is None else self.labels[positions]
        return replace(self, indices=self.indices[positions], labels=labels)

    def with_square_crop(self) -> ImageSource:
        return replace(self, square_crop=True)


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise OSError(f"{path}: cannot read image ({error})") from error


def file_list_source(paths: Sequence[Path], name: str, labels: np.ndarray | None = None) -> ImageSource:
    """Images from explicit files; the identity covers each file's path, size and modification time."""
    paths = [Path(p) for p in paths]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{name}: {len(missing)} image files missing, e.g. {missing[:5]}")
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in paths]
    return ImageSource(name, stable_hash(stats), lambda i: _open_rgb(paths[i]), np.arange(len(paths)), labels)


def image_folder_source(root: str | Path) -> ImageSource:
    """ImageFolder layout `root/<class>/<image>`; classes are the sorted sub-folder names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder does not exist")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir())
    if not class_dirs:
        raise ValueError(f"{root}: no class sub-folders (expected <root>/<class>/<image>)")
    paths: list[Path] = []
    labels: list[int] = []
    for label, class_dir in enumerate(class_dirs):
        files = sorted(p for p in class_dir.iterdir() if p.is_file())
        others = [p.name for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]
        if others or not files:
            raise ValueError(
                f"{class_dir}: want only image files {IMAGE_EXTENSIONS}; found {others[:5] or 'none'}"
            )
        paths += files
        labels += [label] * len(files)
    source = file_list_source(paths, name=str(root), labels=np.asarray(labels, dtype=np.int64))
    return replace(source, class_names=[p.name for p in class_dirs])


def hf_dataset_source(
    path: str | Path,
    split: str | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
) -> ImageSource:
    """A `datasets.save_to_disk` directory (Dataset, or DatasetDict with `split`)."""
    import datasets

    data = datasets.load_from_disk(str(path))
    if isinstance(data, datasets.DatasetDict):
        if split not in data:
            raise ValueError(f"{path}: a DatasetDict with splits {list(data)}; pass one of them as split")
        data = data[split]
    if image_column not in data.column_names:
        raise ValueError(f"{path}: no image column {image_column!r} (columns: {data.column_names})")
    labels = class_names = None
    if label_column in data.column_names:
        labels = np.asarray(data[label_column], dtype=np.int64)
        class_names = getattr(data.features[label_column], "names", None)

    def load_item(index: int) -> Image.Image:
        image = data[index][image_column]
        if not isinstance(image, Image.Image):
            raise TypeError(f"{path}: record {index} column {image_column!r} holds {type(image).__name__}")
        return image.convert("RGB")

    key = stable_hash([str(Path(path).resolve()), split, data._fingerprint])
    return ImageSource(f"{path}:{split}", key, load_item, np.arange(len(data)), labels, class_names)


def array_source(
    images: np.ndarray | Sequence[np.ndarray], labels: Sequence[int] | None = None, name: str = "arrays"
) -> ImageSource:
    """In-memory uint8 images, [H, W] (grayscale) or [H, W, 3] each; the identity is a hash of the pixels."""
    arrays = [np.asarray(image) for image in images]
    for index, array in enumerate(arrays):
        if array.dtype != np.uint8 or array.ndim not in (2, 3) or array.shape[2:] not in ((), (3,)):
            raise ValueError(
                f"{name}: image {index} is {array.dtype} {array.shape}; want uint8 [H,W] or [H,W,3]"
            )
    label_array = None if labels is None else np.asarray(labels, dtype=np.int64)
    if label_array is not None and len(label_array) != len(arrays):
        raise ValueError(f"{name}: {len(arrays)} images but {len(label_array)} labels")
    key = stable_hash([array_digest(array) for array in arrays])

    def load_item(index: int) -> Image.Image:
        return Image.fromarray(arrays[index]).convert("RGB")

    return ImageSource(name, key, load_item, np.arange(len(arrays)), label_array)


def center_square_crop(image: Image.Image) -> Image.Image:
    """Largest centred square crop (same box for an image and its mask of equal size)."""
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def image_source_from_args(path: str, data_format: str, split: str | None) -> ImageSource:
    """CLI helper: an ImageFolder directory (`path/split` when a split is given) or a datasets directory."""
    if data_format == "imagefolder":
        return image_folder_source(Path(path) / split if split else path)
    return hf_dataset_source(path, split)
