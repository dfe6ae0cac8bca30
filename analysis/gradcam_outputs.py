"""What `python -m analysis.gradcam` writes for one sample: maps, image, overlays, figures and rows.

The files and the row fields are those of docs/CONTRACTS.md §4 (kind ``gradcam``), listed in the
module docstring of analysis.gradcam; the localisation scores (mass in the record's ``meta.box`` or
``meta.mask``, normalised entropy) are analysis.gradcam_metrics'.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from analysis import gradcam_metrics as gm
from analysis import plots
from llava.data.errors import RecordError
from llava.data.images import load_image
from llava.data.records import PreferenceRecord, resolve_image_path

if TYPE_CHECKING:
    from analysis.gradcam import GradcamConfig, StepMap


def region_coverage(
    record: PreferenceRecord,
    image: Image.Image,
    grid_shape: tuple[int, int],
    extent: gm.Extent,
    image_folder: str | None,
) -> np.ndarray | None:
    """Cell coverage of the record's ``meta.box`` or ``meta.mask`` (a mask image path); None without one."""
    box, mask = record.meta.get("box"), record.meta.get("mask")
    try:
        if box is not None:
            return gm.box_coverage(gm.check_box(box, image.height, image.width), grid_shape, extent)
        if mask is not None:
            pixels = np.asarray(
                load_image(resolve_image_path(mask, image_folder), record.id, record.source).convert("L")
            )
            if pixels.shape != (image.height, image.width):
                raise ValueError(f"mask {mask} is {pixels.shape[::-1]}, image is {image.size}")
            return gm.mask_coverage(pixels, grid_shape, extent)
    except ValueError as error:
        raise RecordError(record.source, record.id, f"meta: {error}") from error
    return None


def safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", sample_id).strip("_") or "sample"


def save_overlay(image: np.ndarray, grid: np.ndarray, out_path: Path, vmax: float, title: str) -> Path:
    """The map over the image with an absolute colour scale [0, vmax]."""
    height, width = image.shape[:2]
    fig = Figure(figsize=(3.4, 3.0), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.imshow(image)
    shown = ax.imshow(grid, cmap="jet", alpha=0.5, vmin=0.0, vmax=vmax, extent=(0, width, height, 0))
    fig.colorbar(shown, ax=ax, label="‖∂L/∂A‖ per token")
    ax.set_title(title, fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100, format="png")
    return out_path


def write_sample_outputs(
    out: Path,
    record: PreferenceRecord,
    image: Image.Image,
    extent: gm.Extent,
    maps: dict[str, list[StepMap]],
    cfg: GradcamConfig,
    image_folder: str | None,
) -> list[dict[str, Any]]:
    """Save one sample's maps, image, overlays and side-by-side figures; return its results rows."""
    name = safe_name(record.id)
    shown = image.crop(tuple(round(v) for v in extent))
    image_rel = Path("images") / f"{name}.png"
    for folder in ("images", "maps"):
        (out / folder).mkdir(parents=True, exist_ok=True)
    shown.save(out / image_rel)
    pixels = np.asarray(shown)
    rows = []
    for index, step in enumerate(cfg.steps):
        suffix = f"_step{step}" if len(cfg.steps) > 1 else ""
        step_maps = {loss: maps[loss][index] for loss in cfg.loss_types}
        grid_shape = step_maps[cfg.loss_types[0]].grid.shape
        coverage = region_coverage(record, image, grid_shape, extent, image_folder)
        vmax = max(float(m.grid.max()) for m in step_maps.values()) or 1.0
        stats = {}
        for loss, step_map in step_maps.items():
            map_rel = Path("maps") / f"{name}_{loss}{suffix}.npy"
            np.save(out / map_rel, step_map.grid)
            flat = not step_map.grid.any()  # GRPO, all rewards equal: no gradient (analysis.gradcam_grpo)
            mass = None if coverage is None or flat else gm.mass_in_region(step_map.grid, coverage)
            stats[loss] = {} if mass is None else {"mass_in_box": mass}
            overlay = out / "overlays" / f"{name}_{loss}{suffix}.png"
            save_overlay(pixels, step_map.grid, overlay, vmax, f"{record.id} {loss} step {step}")
            rows.append(
                {
                    "id": record.id,
                    "loss_type": loss,
                    "step": step,
                    "loss": step_map.loss,
                    "learning_rate": step_map.learning_rate,
                    "mass_in_box": mass,
                    "entropy": None if flat else gm.normalised_entropy(step_map.grid),
                    "map_npy": map_rel.as_posix(),
                    "image": image_rel.as_posix(),
                    "grid": list(step_map.grid.shape),
                }
            )
        sample = plots.GradcamSample(record.id, pixels, {k: m.grid for k, m in step_maps.items()}, stats)
        figure = out / "figures" / f"{name}{suffix}.png"
        plots.plot_gradcam_grid(
            [sample], figure, loss_types=cfg.loss_types, title=f"{record.id} (step {step})"
        )
    return rows
