"""Figures of the paper (Song et al. 2025) from results rows (docs/CONTRACTS.md §4), drawn with matplotlib.

One function per figure type; each takes data (rows as dicts, or loaded Grad-CAM maps), never paths,
plus the output PNG path, and returns that path:

- ``plot_category_bars``  Figures 2–3: Cambrian category averages, one bar per loss type (SFT, DPO,
  GRPO, ...), across encoder sizes (``x_key="vision_tower"``) or LLM sizes (``x_key="llm"``); rows of
  kind ``benchmarks``.
- ``plot_data_scaling``   Figures 4–5: category averages against the Stage-2 data size, one line per
  loss type; rows of kind ``benchmarks`` with ``data_size``.
- ``plot_linear_probe``   Figure 6: linear-probe top-1 against encoder size, one panel per feature
  point (encoder output, encoder + projector); rows of kind ``linear_probe``.
- ``plot_seg_recall``     Figure 8: ADE20K patch-segmentation recall bars with the gain over SFT
  written above each other loss's bar, one panel per feature point; rows of kind ``seg_probe`` (one
  per seed, averaged here).
- ``plot_alignment``      Figure 10: mutual k-NN alignment bars per language model; rows of kind
  ``alignment``; rows of different studies (encoder tower, LLM, ...) are separate bars.
- ``plot_gradcam_grid``   Figure 7: rows = samples, columns = image | one gradient map per loss type
  (e.g. SFT | DPO | GRPO) overlaid.

Titles name the loss types drawn ("SFT vs DPO vs GRPO", ``versus``). Repeated rows (seeds) are
averaged and drawn with ±1 std error bars. A row without a key the figure needs raises ``ValueError``
naming the figure, the row and the key. Rows without ``loss_type`` in the probe figures are the
original encoder and are drawn as "base". Fractions (probe accuracies, recalls) are drawn as
percentages; benchmark scores are already 0–100; alignment scores stay 0–1.
Rendering uses the Agg canvas directly, so importing this module leaves the pyplot backend alone.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

Row = Mapping[str, Any]

CATEGORY_PANELS: tuple[str, ...] = ("Average", "General", "Knowledge", "OCR & Chart", "Vision-centric")
LOSS_ORDER: tuple[str, ...] = ("base", "sft", "dpo", "mpo", "grpo")
LOSS_COLORS: dict[str, str] = {
    "base": "#9e9e9e",
    "sft": "#4c72b0",
    "dpo": "#dd8452",
    "mpo": "#55a868",
    "grpo": "#c44e52",
}
EXTRA_COLORS: tuple[str, ...] = ("#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974")
SIZE_WORDS: dict[str, int] = {
    "tiny": 0,
    "small": 1,
    "s": 1,
    "base": 2,
    "b": 2,
    "medium": 3,
    "large": 4,
    "l": 4,
    "so400m": 5,
    "so": 5,
    "huge": 6,
    "h": 6,
    "giant": 7,
    "g": 7,
}
# Labels and settings that set one alignment study apart from another under one results directory.
ALIGNMENT_STUDY_KEYS: tuple[str, ...] = (
    "vision_tower",
    "llm",
    "data_size",
    "pool",
    "num_samples",
    "outlier_clamp",
)
_PARAM_COUNT = re.compile(r"(\d+(?:\.\d+)?)\s*([mb])(?![a-z])", re.IGNORECASE)
_DATA_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([km]?)\s*$", re.IGNORECASE)


@dataclass
class GradcamSample:
    """One Grad-CAM grid row: the image (H×W×3, or None) and a patch-grid map per loss type."""

    id: str
    image: np.ndarray | None
    maps: dict[str, np.ndarray]
    stats: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class Summary:
    """Mean, sample std (0 for one value) and count of a group of rows."""

    mean: float
    std: float
    n: int


def require(rows: Sequence[Row], keys: Sequence[str], figure: str) -> None:
    """Raise ``ValueError`` naming the figure, row and key when a row lacks a needed key."""
    if not rows:
        raise ValueError(f"{figure}: no rows to plot")
    for index, row in enumerate(rows):
        for key in keys:
            if row.get(key) is None:
                name = row.get("run", row.get("id", f"#{index}"))
                raise ValueError(f"{figure}: row {index} ({name}) has no {key!r}; keys: {sorted(row)}")


def loss_label(row: Row) -> str:
    """The row's loss type in lower case; rows without one are the original encoder ("base")."""
    return str(row.get("loss_type") or "base").lower()


def _parameter_count(value: Any) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _PARAM_COUNT.findall(str(value))
    if not match:
        return None
    number, unit = match[-1]
    return float(number) * (1e6 if unit.lower() == "m" else 1e9)


def _size_word(value: Any) -> float | None:
    for token in re.split(r"[^a-z0-9]+", str(value).lower()):
        if token in SIZE_WORDS:
            return float(SIZE_WORDS[token])
    return None


def order_values(values: Sequence[Any]) -> list[Any]:
    """Distinct values sorted by size when every one has a size of the same kind, else as they come.

    Sizes: numbers, parameter counts in the name ("Qwen2.5-1.5B", "so400m"), or size words
    ("base" < "large" < "so400m" < "giant"); one rule must fit all values, so scales never mix.
    """
    distinct = list(dict.fromkeys(values))
    for rule in (_parameter_count, _size_word):
        keys = [rule(v) for v in distinct]
        if all(k is not None for k in keys):
            return [v for _, v in sorted(zip(keys, distinct), key=lambda pair: pair[0])]
    return distinct


def order_losses(losses: Sequence[str]) -> list[str]:
    distinct = list(dict.fromkeys(losses))
    known = [loss for loss in LOSS_ORDER if loss in distinct]
    return known + [loss for loss in distinct if loss not in LOSS_ORDER]


def versus(losses: Sequence[str]) -> str:
    """The loss types in figure order joined by " vs " ("SFT vs DPO vs GRPO"): the known ones (`LOSS_COLORS`) upper
    case, other labels (a control's "dpo (frozen tower)") as written."""
    return " vs ".join(loss.upper() if loss in LOSS_COLORS else loss for loss in order_losses(losses))


def loss_color(loss: str, others: Sequence[str]) -> str:
    if loss in LOSS_COLORS:
        return LOSS_COLORS[loss]
    extra = [o for o in others if o not in LOSS_COLORS]
    return EXTRA_COLORS[extra.index(loss) % len(EXTRA_COLORS)]


def data_size_number(value: Any) -> float:
    """20000, "20000", "20K", "1.5M" → a number of samples."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    match = _DATA_SIZE.match(str(value))
    if not match:
        raise ValueError(f"data_size {value!r} is not a number or a count like '20K'")
    number, unit = match.groups()
    return float(number) * {"": 1, "k": 1e3, "m": 1e6}[unit.lower()]


def group_mean_std(
    rows: Sequence[Row], keys: Sequence[str], value: str, scale: float = 1.0
) -> dict[tuple, Summary]:
    """Mean/std of ``value`` (times ``scale``) per distinct tuple of ``keys``; None values are skipped."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        if row.get(value) is None:
            continue
        key = tuple(loss_label(row) if k == "loss_type" else row.get(k) for k in keys)
        groups.setdefault(key, []).append(float(row[value]) * scale)
    return {
        key: Summary(float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))
        for key, vals in groups.items()
    }


def _new_figure(n_panels: int, panel_width: float = 3.2, height: float = 3.0) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(max(panel_width * n_panels, 4.0), height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n_panels, squeeze=False)[0]
    return fig, list(axes)


def _save(fig: Figure, out_path: Path) -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=100, format="png")
    return out_path


def _grouped_bars(
    ax: Axes,
    stats: dict[tuple, Summary],
    xs: Sequence[Any],
    hues: Sequence[str],
    colors: Sequence[str],
    fmt: str,
) -> dict[tuple, tuple[float, float]]:
    """Bars at x positions, one per hue; returns the (x, top) of every drawn bar for annotations."""
    width = 0.8 / max(len(hues), 1)
    tops: dict[tuple, tuple[float, float]] = {}
    for h, (hue, color) in enumerate(zip(hues, colors)):
        for i, x in enumerate(xs):
            stat = stats.get((x, hue))
            if stat is None:
                continue
            pos = i - 0.4 + width * (h + 0.5)
            first = all(drawn != hue for _, drawn in tops)
            ax.bar(
                pos,
                stat.mean,
                width,
                color=color,
                label=hue if first else None,
                yerr=stat.std if stat.n > 1 else None,
                capsize=2,
            )
            ax.annotate(
                format(stat.mean, fmt),
                (pos, stat.mean),
                ha="center",
                va="top",
                fontsize=6,
                color="white",
                xytext=(0, -2),
                textcoords="offset points",
            )
            tops[(x, hue)] = (pos, stat.mean + (stat.std if stat.n > 1 else 0.0))
    ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=20 if len(xs) > 3 else 0, fontsize=7)
    return tops


def _tight_ylim(ax: Axes, values: Sequence[float], floor: float = 0.0) -> None:
    if values:
        low, high = min(values), max(values)
        margin = max((high - low) * 0.25, 2.0 if high > 1.5 else 0.02)
        ax.set_ylim(max(floor, low - margin), high + margin)


def plot_category_bars(
    rows: Sequence[Row],
    out_path: Path,
    x_key: str = "vision_tower",
    panels: Sequence[str] = CATEGORY_PANELS,
    title: str | None = None,
) -> Path:
    """Figures 2–3: bars of each category average per ``x_key`` value, one bar per loss type."""
    require(rows, ["run", "loss_type", x_key], f"category bars ({x_key})")
    xs = order_values([row[x_key] for row in rows])
    losses = order_losses([loss_label(row) for row in rows])
    colors = [loss_color(loss, losses) for loss in losses]
    fig, axes = _new_figure(len(panels))
    for ax, panel in zip(axes, panels):
        stats = group_mean_std(rows, [x_key, "loss_type"], panel)
        _grouped_bars(ax, stats, xs, losses, colors, ".1f")
        _tight_ylim(ax, [s.mean for s in stats.values()])
        ax.set_title(panel, fontsize=9)
        if not stats:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    axes[0].set_ylabel("score (0–100)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or f"{versus(losses)} across {x_key}", fontsize=10)
    return _save(fig, out_path)


def plot_data_scaling(
    rows: Sequence[Row], out_path: Path, panels: Sequence[str] = CATEGORY_PANELS, title: str | None = None
) -> Path:
    """Figures 4–5: category averages against the Stage-2 data size, one line per loss type."""
    require(rows, ["run", "loss_type", "data_size"], "data scaling")
    numeric = [{**row, "data_size": data_size_number(row["data_size"])} for row in rows]
    losses = order_losses([loss_label(row) for row in numeric])
    sizes = sorted({row["data_size"] for row in numeric})
    fig, axes = _new_figure(len(panels))
    for ax, panel in zip(axes, panels):
        stats = group_mean_std(numeric, ["data_size", "loss_type"], panel)
        for loss in losses:
            points = [(size, stats[(size, loss)]) for size in sizes if (size, loss) in stats]
            if not points:
                continue
            ax.errorbar(
                [p[0] for p in points],
                [p[1].mean for p in points],
                yerr=[p[1].std for p in points],
                marker="o",
                ms=4,
                capsize=2,
                label=loss,
                color=loss_color(loss, losses),
            )
        if sizes and sizes[-1] / max(sizes[0], 1e-9) >= 10:
            ax.set_xscale("log")
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("training samples", fontsize=8)
        ax.tick_params(labelsize=7)
    axes[0].set_ylabel("score (0–100)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "Scaling the Stage-2 data", fontsize=10)
    return _save(fig, out_path)


def plot_linear_probe(
    rows: Sequence[Row],
    out_path: Path,
    method: str = "logreg",
    x_key: str = "vision_tower",
    metric: str = "top1",
    title: str | None = None,
) -> Path:
    """Figure 6: linear-probe accuracy (%) against encoder size; a panel per feature point."""
    chosen = [row for row in rows if row.get("method") == method]
    if not chosen:
        found = sorted({str(row.get("method")) for row in rows})
        raise ValueError(f"linear probe: no rows with method {method!r}; methods found: {found}")
    require(chosen, ["feature_point", x_key, metric], "linear probe")
    points = order_values([row["feature_point"] for row in chosen])
    xs = order_values([row[x_key] for row in chosen])
    losses = order_losses([loss_label(row) for row in chosen])
    fig, axes = _new_figure(len(points), panel_width=3.6)
    for ax, point in zip(axes, points):
        stats = group_mean_std(
            [r for r in chosen if r["feature_point"] == point], [x_key, "loss_type"], metric, 100
        )
        for loss in losses:
            line = [(i, stats[(x, loss)]) for i, x in enumerate(xs) if (x, loss) in stats]
            if line:
                ax.errorbar(
                    [p[0] for p in line],
                    [p[1].mean for p in line],
                    yerr=[p[1].std for p in line],
                    marker="o",
                    ms=4,
                    capsize=2,
                    label=loss,
                    color=loss_color(loss, losses),
                )
        ax.set_xticks(range(len(xs)), [str(x) for x in xs], rotation=20 if len(xs) > 3 else 0, fontsize=7)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_title(f"features: {point}", fontsize=9)
    axes[0].set_ylabel(f"{metric} accuracy (%)")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or f"Linear probe ({method}) vs encoder size", fontsize=10)
    return _save(fig, out_path)


def plot_seg_recall(
    rows: Sequence[Row],
    out_path: Path,
    x_key: str = "vision_tower",
    metric: str = "recall",
    reference: str = "sft",
    title: str | None = None,
) -> Path:
    """Figure 8: segmentation-probe recall (%) bars per encoder; gains over ``reference`` annotated.

    One panel per ``feature_point`` (rows without one share a panel), so probes of one run at the
    encoder output and after the projector are never averaged together.
    """
    require(rows, [x_key, metric], "segmentation recall")
    points = order_values([row.get("feature_point") for row in rows])
    xs = order_values([row[x_key] for row in rows])
    losses = order_losses([loss_label(row) for row in rows])
    colors = [loss_color(loss, losses) for loss in losses]
    fig, axes = _new_figure(len(points), panel_width=max(2.0 * len(xs), 4.0), height=3.4)
    for ax, point in zip(axes, points):
        stats = group_mean_std(
            [row for row in rows if row.get("feature_point") == point], [x_key, "loss_type"], metric, 100
        )
        tops = _grouped_bars(ax, stats, xs, losses, colors, ".1f")
        for (x, loss), (pos, top) in tops.items():
            base = stats.get((x, reference))
            if loss != reference and loss != "base" and base is not None:
                gain = stats[(x, loss)].mean - base.mean
                ax.annotate(
                    f"{gain:+.1f}",
                    (pos, top),
                    ha="center",
                    va="bottom",
                    fontsize=8,
                    fontweight="bold",
                    color="#2e7d32" if gain >= 0 else "#c62828",
                    xytext=(0, 8),
                    textcoords="offset points",
                )
        _tight_ylim(ax, [s.mean for s in stats.values()])
        if point is not None:
            ax.set_title(f"features: {point}", fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(f"{metric} (%)")
    fig.suptitle(title or f"ADE20K segmentation probe {metric} (gain vs {reference})", fontsize=10)
    return _save(fig, out_path)


def _hue_colors(rows: Sequence[Row], hue_key: str, hues: Sequence[str]) -> list[str]:
    """Loss-type colours when each hue (e.g. an encoder) has its own known loss type, else a palette."""
    losses = [{loss_label(r) for r in rows if str(r[hue_key]) == hue} for hue in hues]
    named = [next(iter(group)) for group in losses if len(group) == 1]
    if len(named) == len(hues) and len(set(named)) == len(hues) and set(named) <= set(LOSS_COLORS):
        return [LOSS_COLORS[loss] for loss in named]
    return [EXTRA_COLORS[i % len(EXTRA_COLORS)] for i in range(len(hues))]


def plot_alignment(
    rows: Sequence[Row],
    out_path: Path,
    hue_key: str = "vision",
    x_key: str = "language",
    label_keys: Sequence[str] = ALIGNMENT_STUDY_KEYS,
    title: str | None = None,
) -> Path:
    """Figure 10: mutual k-NN alignment score bars per language model, one bar per ``hue_key``.

    Where a key of ``label_keys`` takes several values across the rows (studies of different
    encoder towers or LLMs under one results directory, each naming its models ``sft``, ``dpo``),
    each bar is one (``hue_key``, labels) pair, named e.g. ``sft (siglip2-b16)``: studies never
    average together.
    """
    require(rows, [hue_key, x_key, "score", "metric"], "alignment")
    varying = [k for k in label_keys if len({str(r[k]) for r in rows if r.get(k) is not None}) > 1]

    def bar_name(row: Row) -> str:
        labels = ", ".join("–" if row.get(k) is None else str(row[k]) for k in varying)
        return f"{row[hue_key]} ({labels})" if varying else str(row[hue_key])

    rows = [{**row, hue_key: bar_name(row)} for row in rows]
    metrics = order_values([row["metric"] for row in rows])
    fig, axes = _new_figure(
        len(metrics), panel_width=max(1.6 * len({r[x_key] for r in rows}), 4.0), height=3.4
    )
    for ax, metric in zip(axes, metrics):
        subset = [row for row in rows if row["metric"] == metric]
        xs = order_values([row[x_key] for row in subset])
        hues = list(dict.fromkeys(row[hue_key] for row in subset))
        stats = group_mean_std(subset, [x_key, hue_key], "score")
        palette = _hue_colors(subset, hue_key, hues)
        _grouped_bars(ax, stats, xs, hues, palette, ".3f")
        _tight_ylim(ax, [s.mean for s in stats.values()])
        ks = sorted({row.get("k") for row in subset if row.get("k") is not None})
        ax.set_title(f"{metric}" + (f" (k={', '.join(map(str, ks))})" if ks else ""), fontsize=9)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("alignment score")
    fig.suptitle(title or "Vision–language alignment", fontsize=10)
    return _save(fig, out_path)


def plot_gradcam_grid(
    samples: Sequence[GradcamSample],
    out_path: Path,
    loss_types: Sequence[str] = ("sft", "dpo"),
    alpha: float = 0.5,
    title: str | None = None,
) -> Path:
    """Figure 7: one row per sample; columns image | one overlay per loss type.

    The maps of a row share one colour scale, 0 to the largest value among them, so the gradient
    magnitudes of the loss types on the same sample compare directly.
    """
    if not samples:
        raise ValueError("Grad-CAM grid: no samples")
    for sample in samples:
        absent = [loss for loss in loss_types if loss not in sample.maps]
        if len(absent) == len(loss_types):
            raise ValueError(f"Grad-CAM grid: sample {sample.id!r} has none of the maps {list(loss_types)}")
    with_image = any(sample.image is not None for sample in samples)
    ncols = len(loss_types) + int(with_image)
    fig = Figure(figsize=(2.2 * ncols, 2.2 * len(samples) + 0.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(samples), ncols, squeeze=False)
    headers = (["image"] if with_image else []) + [loss.upper() for loss in loss_types]
    for r, sample in enumerate(samples):
        row_axes = list(axes[r])
        row_max = max(
            (float(np.max(sample.maps[loss])) for loss in loss_types if loss in sample.maps), default=0.0
        )
        scale = row_max if row_max > 0 else 1.0
        if with_image:
            ax = row_axes.pop(0)
            if sample.image is not None:
                ax.imshow(sample.image)
            else:
                ax.text(0.5, 0.5, "no image", ha="center", va="center", transform=ax.transAxes, fontsize=8)
            ax.set_ylabel(str(sample.id), fontsize=8)
        for ax, loss in zip(row_axes, loss_types):
            height, width = sample.image.shape[:2] if sample.image is not None else (None, None)
            if loss not in sample.maps:
                ax.text(
                    0.5, 0.5, f"no {loss} map", ha="center", va="center", transform=ax.transAxes, fontsize=8
                )
            elif sample.image is not None:
                ax.imshow(sample.image)
                ax.imshow(
                    sample.maps[loss] / scale,
                    cmap="jet",
                    vmin=0.0,
                    vmax=1.0,
                    alpha=alpha,
                    interpolation="bilinear",
                    extent=(0, width, height, 0),
                )
            else:
                ax.imshow(sample.maps[loss] / scale, cmap="jet", vmin=0.0, vmax=1.0, interpolation="nearest")
            mass = sample.stats.get(loss, {}).get("mass_in_box")
            if mass is not None:
                ax.set_xlabel(f"mass in box {mass:.2f}", fontsize=7)
            if not with_image and ax is row_axes[0]:
                ax.set_ylabel(str(sample.id), fontsize=8)
        for c, ax in enumerate(axes[r]):
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(headers[c], fontsize=9)
    shown = " vs ".join(loss.upper() for loss in loss_types)
    fig.suptitle(title or f"Gradient maps on the vision tokens ({shown})", fontsize=10)
    return _save(fig, out_path)
