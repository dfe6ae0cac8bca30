"""Patch labels, metrics and colours for the segmentation probe (patch-seg protocol, DESIGN §5).

Union labels: a patch is multi-hot over every class present in its pixels; class 0 ("unlabeled") is an
ordinary class but is cleared in any patch that also holds another class. Masks get the same centred
square crop as the images and a nearest-neighbour resize to the encoder's input size.

Metrics (patch-seg `UnionMetricsHelper`): predictions are sigmoid > threshold per (patch, class). Per class,
recall = TP/(TP+FN) and precision = TP/(TP+FP) (0 when the class is never predicted); F1 = 2PR/(P+R)
(0 when both are 0). Macro averages run over the classes with at least one positive patch. Micro accuracy
is the fraction of correct (patch, class) entries.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from analysis.image_sources import center_square_crop


def load_mask(path: Path, size: tuple[int, int], num_classes: int) -> np.ndarray:
    """Class-index mask (uint8 PNG), centre square crop, nearest resize to (height, width)."""
    with Image.open(path) as mask:
        if mask.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"{path}: annotation mode {mask.mode}; want a single-channel class-index PNG")
        mask = center_square_crop(mask).resize((size[1], size[0]), Image.NEAREST)
        array = np.asarray(mask).astype(np.int64)
    if array.max(initial=0) >= num_classes or array.min(initial=0) < 0:
        raise ValueError(f"{path}: class index {array.max()} outside [0, {num_classes})")
    return array


def union_patch_labels(masks: np.ndarray, grid: tuple[int, int], num_classes: int) -> np.ndarray:
    """Multi-hot union labels, [..., H, W] int masks → [..., gh*gw, num_classes] bool (row-major patches)."""
    masks = np.asarray(masks)
    *lead, height, width = masks.shape
    rows, cols = grid
    if height % rows or width % cols:
        raise ValueError(f"mask {height}x{width} does not split into a {rows}x{cols} patch grid")
    if masks.size and (masks.min() < 0 or masks.max() >= num_classes):
        raise ValueError(f"mask values must lie in [0, {num_classes}); got [{masks.min()}, {masks.max()}]")
    flat = masks.reshape(-1, rows, height // rows, cols, width // cols)
    pixels = flat.transpose(0, 1, 3, 2, 4).reshape(len(flat), rows * cols, -1)
    labels = np.zeros((len(flat), rows * cols, num_classes), dtype=bool)
    labels[np.arange(len(flat))[:, None, None], np.arange(rows * cols)[None, :, None], pixels] = True
    labels[..., 0] &= ~labels[..., 1:].any(axis=-1)
    return labels.reshape(*lead, rows * cols, num_classes)


def pack_labels(labels: np.ndarray) -> np.ndarray:
    """Bit-pack the class axis (151 classes → 19 bytes per patch)."""
    return np.packbits(labels, axis=-1)


def unpack_labels(packed: np.ndarray, num_classes: int) -> np.ndarray:
    return np.unpackbits(packed, axis=-1, count=num_classes).astype(bool)


@dataclass
class PatchCounts:
    """Per-class confusion counts over (patch, class) entries; add batches with `update`."""

    tp: np.ndarray
    fp: np.ndarray
    fn: np.ndarray
    tn: np.ndarray

    @classmethod
    def zeros(cls, num_classes: int) -> PatchCounts:
        return cls(*(np.zeros(num_classes, dtype=np.int64) for _ in range(4)))

    def update(self, predicted: torch.Tensor | np.ndarray, target: torch.Tensor | np.ndarray) -> None:
        predicted, target = torch.as_tensor(predicted).bool(), torch.as_tensor(target).bool()
        num_classes = predicted.shape[-1]
        predicted, target = predicted.reshape(-1, num_classes), target.reshape(-1, num_classes)
        self.tp += (predicted & target).sum(0).cpu().numpy()
        self.fp += (predicted & ~target).sum(0).cpu().numpy()
        self.fn += (~predicted & target).sum(0).cpu().numpy()
        self.tn += (~predicted & ~target).sum(0).cpu().numpy()


def patch_metrics(counts: PatchCounts) -> dict[str, float]:
    """Macro recall/precision/F1 over classes with ≥ 1 positive patch, and micro accuracy.

    `precision` counts a class that has positives but is never predicted as 0 (its defined value as
    the limit of no true positive). patch-seg (Covert et al.) divides 0 by 0 there, which makes its macro
    precision NaN; the number it reports whenever that NaN is skipped, the macro precision over the
    classes that were predicted at least once, is `precision_predicted` (NaN if no class was predicted).
    """
    valid = (counts.tp + counts.fn) > 0
    if not valid.any():
        raise ValueError("no class has a positive patch: the evaluation set is empty")
    recall = counts.tp[valid] / (counts.tp + counts.fn)[valid]
    predicted = (counts.tp + counts.fp)[valid]
    precision = np.divide(counts.tp[valid], predicted, out=np.zeros(valid.sum()), where=predicted > 0)
    was_predicted = predicted > 0
    precision_predicted = float(precision[was_predicted].mean()) if was_predicted.any() else float("nan")
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros(valid.sum()), where=denominator > 0)
    total = counts.tp + counts.fp + counts.fn + counts.tn
    return {
        "recall": float(recall.mean()),
        "micro_accuracy": float((counts.tp + counts.tn).sum() / total.sum()),
        "precision": float(precision.mean()),
        "precision_predicted": precision_predicted,
        "f1": float(f1.mean()),
        "n_classes_evaluated": int(valid.sum()),
    }


def class_palette(num_classes: int) -> np.ndarray:
    """Fixed RGB palette, [num_classes, 3] uint8; class 0 is black, the others seeded random colours."""
    palette = np.random.default_rng(20251016).integers(40, 256, size=(num_classes, 3), dtype=np.uint8)
    palette[0] = 0
    return palette


def colorize(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """Class-index mask [H, W] → RGB [H, W, 3] uint8."""
    return palette[np.asarray(mask, dtype=np.int64)]


def patch_map_to_pixels(
    patch_classes: np.ndarray, grid: tuple[int, int], size: tuple[int, int]
) -> np.ndarray:
    """Row-major per-patch class indices [gh*gw] → [H, W] by nearest upsampling."""
    rows, cols = grid
    grid_map = patch_classes.reshape(rows, cols)
    return np.repeat(np.repeat(grid_map, size[0] // rows, axis=0), size[1] // cols, axis=1)
