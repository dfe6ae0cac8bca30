"""Grad-CAM map geometry and quantitative localisation (beyond the paper, Song et al. 2025, Fig. 7).

- ``token_grid``: per-token ‖∂L/∂A‖₂ (L2 over channels) → a grid aligned with the image; for anyres
  models the tile tokens are laid out as HF's ``pack_image_features`` does, unpadded, and the base
  tile's map is added after ``redistribute`` (see ``analysis.gradcam``'s docstring).
- ``map_extent``: which rectangle of the original image the grid covers after resize/crop.

A map is a non-negative grid ``[h, w]`` of per-token gradient magnitudes laid over a rectangle of the
original image, its *extent* ``(x0, y0, x1, y1)`` in pixels (the region the vision tokens see after
the image processor's resize/crop; see ``map_extent``). Cells split the extent
evenly. Geometry is continuous: pixel ``(x, y)`` is the unit square ``[x, x+1) x [y, y+1)`` and a box
``[x0, y0, x1, y1]`` (exclusive ends, the synthetic world's and MMPR converter's convention) is the
rectangle ``[x0, x1) x [y0, y1)``.

- ``box_coverage`` / ``mask_coverage``: the fraction of each cell's area inside the region.
- ``mass_in_region``: ``sum(map * coverage) / sum(map)``, the share of gradient mass on the region.
- ``normalised_entropy``: ``H(p) / log(n)`` with ``p = map / sum(map)`` over the ``n`` cells
  (1 = uniform, 0 = all mass on one cell).
- ``redistribute``: mass-preserving area resampling of a grid onto another grid over the same extent.

``python -m analysis.gradcam_metrics RESULTS.json... --out_dir DIR`` averages ``mass_in_box`` and
``entropy`` of kind-``gradcam`` results per (run, loss type, step) into ``DIR/summary.{md,csv}``.
"""

from __future__ import annotations

import argparse
import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig
from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
from transformers.image_utils import ChannelDimension
from transformers.models.llava_onevision.modeling_llava_onevision import unpad_image

from analysis.results_rows import rows_with_file_labels
from llava.file_checks import read_json

Extent = tuple[float, float, float, float]
SUMMARY_FIELDS = (
    "run",
    "loss_type",
    "step",
    "samples",
    "with_box",
    "mass_in_box_mean",
    "mass_in_box_std",
    "entropy_mean",
    "entropy_std",
)


def interval_overlaps(edges_a: np.ndarray, edges_b: np.ndarray) -> np.ndarray:
    """``[len(a)-1, len(b)-1]`` overlap lengths of the intervals ``[a_i, a_i+1)`` and ``[b_j, b_j+1)``."""
    a, b = np.asarray(edges_a, dtype=np.float64), np.asarray(edges_b, dtype=np.float64)
    low = np.maximum(a[:-1, None], b[None, :-1])
    high = np.minimum(a[1:, None], b[None, 1:])
    return np.clip(high - low, 0.0, None)


def cell_edges(n_cells: int, start: float, stop: float) -> np.ndarray:
    """Edges of ``n_cells`` equal cells splitting ``[start, stop)``."""
    if n_cells < 1 or not stop > start:
        raise ValueError(f"need n_cells >= 1 and stop > start, got {n_cells} cells over [{start}, {stop})")
    return start + (stop - start) * np.arange(n_cells + 1) / n_cells


def _check_extent(extent: Extent) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in extent)
    if not (x1 > x0 and y1 > y0):
        raise ValueError(f"extent {extent} must be (x0, y0, x1, y1) with x1 > x0 and y1 > y0")
    return x0, y0, x1, y1


def check_box(box: Sequence[float], height: int, width: int) -> tuple[float, float, float, float]:
    """Validate ``[x0, y0, x1, y1]`` (exclusive ends) against an image of ``height x width`` pixels."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and math.isfinite(v) for v in box):
        raise ValueError(f"box {box!r} must be four finite numbers [x0, y0, x1, y1]")
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(
            f"box {list(box)} is not a non-empty [x0, y0, x1, y1] (exclusive ends) inside a {width}x{height} image"
        )
    return x0, y0, x1, y1


def box_coverage(box: Sequence[float], grid_shape: tuple[int, int], extent: Extent) -> np.ndarray:
    """Fraction of each cell's area inside the box (both in original-image pixels)."""
    x0, y0, x1, y1 = _check_extent(extent)
    rows, cols = grid_shape
    ys = interval_overlaps(cell_edges(rows, y0, y1), [box[1], box[3]])[:, 0]
    xs = interval_overlaps(cell_edges(cols, x0, x1), [box[0], box[2]])[:, 0]
    return np.outer(ys, xs) / (((y1 - y0) / rows) * ((x1 - x0) / cols))


def mask_coverage(mask: np.ndarray, grid_shape: tuple[int, int], extent: Extent) -> np.ndarray:
    """Fraction of each cell's area inside a pixel mask ``[H, W]`` (non-zero = inside) of the original image."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D [H, W], got shape {mask.shape}")
    x0, y0, x1, y1 = _check_extent(extent)
    rows, cols = grid_shape
    height, width = mask.shape
    over_y = interval_overlaps(cell_edges(rows, y0, y1), np.arange(height + 1))
    over_x = interval_overlaps(cell_edges(cols, x0, x1), np.arange(width + 1))
    inside = (mask != 0).astype(np.float64)
    return over_y @ inside @ over_x.T / (((y1 - y0) / rows) * ((x1 - x0) / cols))


def _size_field(size: Any, key: str) -> int | None:
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


def map_extent(image_processor: Any, config: PretrainedConfig, height: int, width: int) -> Extent:
    """(x0, y0, x1, y1): the region of the original image the map covers, after resize/crop.

    anyres: the unpadded tile window (``anyres_layout``), the whole image up to token rounding. Fixed ``{height, width}`` resize (SigLIP): the whole image, each axis
    scaled on its own. Shortest-edge resize + centre crop (CLIP family): the centred region the crop
    keeps. ConvNeXt: shortest edge / crop_pct then centre crop below 384 px, a plain warp above.
    """
    full = (0.0, 0.0, float(width), float(height))
    if config.model_type == "llava_onevision":
        grid = int(
            getattr(config, "pivot_grid", 0)
            or config.vision_config.image_size // config.vision_config.patch_size
        )
        return anyres_layout(config, (height, width), grid).extent
    size = image_processor.size
    shortest = _size_field(size, "shortest_edge")
    fixed = (_size_field(size, "height"), _size_field(size, "width"))
    crop = None
    if getattr(image_processor, "do_center_crop", False):
        crop_size = getattr(image_processor, "crop_size", None)
        crop = (_size_field(crop_size, "height"), _size_field(crop_size, "width"))
    if hasattr(image_processor, "crop_pct") and shortest is not None:
        if shortest >= 384:
            return full
        scale_y = scale_x = shortest / image_processor.crop_pct / min(height, width)
        crop = (shortest, shortest)
    elif fixed[0] and fixed[1]:
        scale_y, scale_x = fixed[0] / height, fixed[1] / width
        crop = crop or fixed
    elif shortest is not None and crop and crop[0] and crop[1]:
        scale_y = scale_x = shortest / min(height, width)
    else:
        raise ValueError(
            f"cannot tell which image region {type(image_processor).__name__} keeps (size {size})"
        )
    side_y, side_x = min(crop[0] / scale_y, height), min(crop[1] / scale_x, width)
    return ((width - side_x) / 2, (height - side_y) / 2, (width + side_x) / 2, (height + side_y) / 2)


def token_grid(grad: torch.Tensor, config: PretrainedConfig, image_hw: tuple[int, int]) -> np.ndarray:
    """Per-token ‖∂L/∂A‖₂ over channels of a one-image sample, as a grid over ``map_extent``."""
    magnitudes = grad.float().norm(dim=-1).cpu()
    prefix = 1 if getattr(config, "mm_vision_select_feature", "patch") == "cls_patch" else 0
    patches = magnitudes.shape[1] - prefix
    grid = int(getattr(config, "pivot_grid", 0) or math.isqrt(patches))
    if patches != grid * grid:
        raise ValueError(
            f"{magnitudes.shape[1]} vision tokens per view is not {prefix} prefix + {grid}x{grid}"
        )
    views = magnitudes[:, prefix:].reshape(-1, grid, grid)
    if config.model_type == "llava_onevision":
        return anyres_grid(views, config, image_hw)
    if views.shape[0] != 1:
        raise ValueError(f"expected one image per sample, got {views.shape[0]} views")
    return views[0].numpy().astype(np.float64)


@dataclass(frozen=True)
class AnyresLayout:
    """Where an anyres image's tile tokens lie: tiling, the unpadded token window, its image extent."""

    rows: int
    cols: int
    keep_y: tuple[int, int]
    keep_x: tuple[int, int]
    extent: Extent


def anyres_layout(config: PretrainedConfig, image_hw: tuple[int, int], grid: int) -> AnyresLayout:
    """The tiling HF picks (``select_best_resolution``), the image's aspect-preserving resize and centred
    padding on that canvas (``get_patch_output_size``), and the token rows/columns ``unpad_image`` keeps;
    the kept window's extent in original-image pixels may reach up to a token into the padding."""
    height, width = image_hw
    tile = int(config.vision_config.image_size)
    best_h, best_w = select_best_resolution([height, width], [list(p) for p in config.image_grid_pinpoints])
    rows, cols = best_h // tile, best_w // tile
    new_h, new_w = get_patch_output_size(
        np.empty((1, height, width), dtype=np.uint8), (best_h, best_w), ChannelDimension.FIRST
    )
    tokens_y, tokens_x = rows * grid, cols * grid
    kept_y, kept_x = unpad_image(torch.empty(1, tokens_y, tokens_x), torch.tensor(image_hw)).shape[1:]
    keep_y = ((tokens_y - kept_y) // 2, (tokens_y - kept_y) // 2 + kept_y)
    keep_x = ((tokens_x - kept_x) // 2, (tokens_x - kept_x) // 2 + kept_x)
    step_y, step_x = best_h / tokens_y, best_w / tokens_x
    scale_y, scale_x = new_h / height, new_w / width
    paste_y, paste_x = (best_h - new_h) // 2, (best_w - new_w) // 2
    extent = (
        (keep_x[0] * step_x - paste_x) / scale_x,
        (keep_y[0] * step_y - paste_y) / scale_y,
        (keep_x[1] * step_x - paste_x) / scale_x,
        (keep_y[1] * step_y - paste_y) / scale_y,
    )
    return AnyresLayout(rows, cols, keep_y, keep_x, extent)


def anyres_grid(views: torch.Tensor, config: PretrainedConfig, image_hw: tuple[int, int]) -> np.ndarray:
    """Base view + tile views ``[1 + tiles, g, g]`` → one map on the unpadded tile mosaic.

    Tiles are laid out as ``pack_image_features`` does (row-major tiles, each ``g x g``) and cropped to
    the unpadded window; the base view (the whole image squashed to one tile) is resampled onto the
    window's cells by area overlap (``redistribute``, mass-preserving) and added.
    """
    grid = views.shape[-1]
    layout = anyres_layout(config, image_hw, grid)
    if views.shape[0] != 1 + layout.rows * layout.cols:
        raise ValueError(
            f"{views.shape[0]} views for a {layout.rows}x{layout.cols} tiling plus the base image"
        )
    mosaic = views[1:].reshape(layout.rows, layout.cols, grid, grid).permute(0, 2, 1, 3)
    mosaic = mosaic.reshape(layout.rows * grid, layout.cols * grid).numpy().astype(np.float64)
    window = mosaic[slice(*layout.keep_y), slice(*layout.keep_x)]
    image_extent = (0.0, 0.0, float(image_hw[1]), float(image_hw[0]))
    return window + redistribute(views[0].numpy(), window.shape, image_extent, layout.extent)


def _check_map(grid: np.ndarray) -> np.ndarray:
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 2 or grid.size == 0:
        raise ValueError(f"Grad-CAM map must be a non-empty 2-D grid, got shape {grid.shape}")
    if not np.all(np.isfinite(grid)) or grid.min() < 0:
        raise ValueError("Grad-CAM map must hold finite non-negative magnitudes")
    if grid.sum() <= 0:
        raise ValueError("Grad-CAM map has zero total mass (the loss does not depend on the vision tokens)")
    return grid


def mass_in_region(grid: np.ndarray, coverage: np.ndarray) -> float:
    """Share of the map's mass inside the region: ``sum(map * coverage) / sum(map)``."""
    grid = _check_map(grid)
    if np.shape(coverage) != grid.shape:
        raise ValueError(f"coverage shape {np.shape(coverage)} differs from the map's {grid.shape}")
    return float((grid * coverage).sum() / grid.sum())


def normalised_entropy(grid: np.ndarray) -> float:
    """``H(p) / log(n)``, ``p = map / sum(map)``; 0 log 0 = 0; a one-cell map has entropy 0."""
    grid = _check_map(grid)
    if grid.size == 1:
        return 0.0
    p = grid.ravel() / grid.sum()
    p = p[p > 0]
    return float(-(p * np.log(p)).sum() / math.log(grid.size))


def redistribute(
    grid: np.ndarray,
    shape: tuple[int, int],
    src_extent: Extent = (0.0, 0.0, 1.0, 1.0),
    dst_extent: Extent = (0.0, 0.0, 1.0, 1.0),
) -> np.ndarray:
    """Resample ``grid`` (over ``src_extent``) onto ``shape`` cells over ``dst_extent``, mass-preserving.

    Each source cell's mass is split over the destination cells by area overlap; a source cell partly
    outside the destination gives all its mass to the part inside (one wholly outside is an error).
    """
    grid = np.asarray(grid, dtype=np.float64)
    sx0, sy0, sx1, sy1 = _check_extent(src_extent)
    dx0, dy0, dx1, dy1 = _check_extent(dst_extent)
    weights = []
    for n_dst, n_src, (d0, d1), (s0, s1) in (
        (shape[0], grid.shape[0], (dy0, dy1), (sy0, sy1)),
        (shape[1], grid.shape[1], (dx0, dx1), (sx0, sx1)),
    ):
        overlap = interval_overlaps(cell_edges(n_dst, d0, d1), cell_edges(n_src, s0, s1))
        inside = overlap.sum(axis=0)
        if np.any(inside <= 0):
            raise ValueError(f"source cells lie wholly outside the destination extent {dst_extent}")
        weights.append(overlap / inside)
    return weights[0] @ grid @ weights[1].T


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    return float(np.mean(values)), float(np.std(values, ddof=1)) if len(values) > 1 else 0.0


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean/std of ``mass_in_box`` (rows that have one) and ``entropy`` per (run, loss_type, step)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        key = (str(row.get("run", "")), str(row["loss_type"]), row.get("step"))
        groups.setdefault(key, []).append(row)
    out = []
    for (run, loss, step), members in groups.items():
        masses = [float(r["mass_in_box"]) for r in members if r.get("mass_in_box") is not None]
        mass_mean, mass_std = _mean_std(masses)
        # A map without gradient (GRPO, equal rewards in the group) has neither mass nor entropy.
        entropy_mean, entropy_std = _mean_std(
            [float(r["entropy"]) for r in members if r.get("entropy") is not None]
        )
        out.append(
            {
                "run": run,
                "loss_type": loss,
                "step": step,
                "samples": len(members),
                "with_box": len(masses),
                "mass_in_box_mean": mass_mean,
                "mass_in_box_std": mass_std,
                "entropy_mean": entropy_mean,
                "entropy_std": entropy_std,
            }
        )
    return out


def read_gradcam_rows(paths: Sequence[str | Path]) -> list[dict[str, Any]]:
    """Rows of kind-``gradcam`` results files, with the file-level run labels filled in (``run`` defaults
    to the file's path)."""
    rows: list[dict[str, Any]] = []
    for path in paths:
        doc = read_json(path, "gradcam results file")
        if not isinstance(doc, dict) or doc.get("kind") != "gradcam":
            raise ValueError(f"{path}: not a results file of kind 'gradcam'")
        for index, row in enumerate(rows_with_file_labels(Path(path), {"run": str(path), **doc})):
            if row.get("loss_type") is None:
                raise ValueError(f"{path} row {index}: missing 'loss_type'")
            rows.append(row)
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def summary_markdown(summary: Sequence[dict[str, Any]]) -> str:
    header = "| " + " | ".join(SUMMARY_FIELDS) + " |"
    lines = [header, "|" + "---|" * len(SUMMARY_FIELDS)]
    lines += ["| " + " | ".join(_cell(row[k]) for k in SUMMARY_FIELDS) + " |" for row in summary]
    return "\n".join(lines) + "\n"


def write_summary(summary: Sequence[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    markdown, table = out / "summary.md", out / "summary.csv"
    markdown.write_text(summary_markdown(summary), encoding="utf-8")
    with open(table, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=SUMMARY_FIELDS)
        writer.writeheader()
        writer.writerows(summary)
    return markdown, table


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "results", nargs="+", help="gradcam.json files written by `python -m analysis.gradcam`"
    )
    parser.add_argument("--out_dir", required=True, help="write summary.md and summary.csv here")
    args = parser.parse_args(argv)
    summary = summarize(read_gradcam_rows(args.results))
    write_summary(summary, args.out_dir)
    print(summary_markdown(summary), end="")
    return summary


if __name__ == "__main__":
    main()
