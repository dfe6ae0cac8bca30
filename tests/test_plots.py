"""Every figure function of analysis/plots.py renders a PNG from the hand-written fixture results."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis import plots

INPUTS = Path(__file__).parent / "fixtures" / "lmms_eval" / "report_inputs"


def _rows(name: str) -> list[dict]:
    return json.loads((INPUTS / name).read_text())["rows"]


def _assert_png(path: Path) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.width > 200 and image.height > 150
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.std() > 5  # something was drawn


def _gradcam_samples(with_image: bool) -> list[plots.GradcamSample]:
    rng = np.random.default_rng(0)
    image = (rng.random((48, 64, 3)) * 255).astype(np.uint8) if with_image else None
    return [
        plots.GradcamSample(
            id=f"s{i}",
            image=image,
            maps={"sft": rng.random((6, 8)), "dpo": rng.random((6, 8))},
            stats={"dpo": {"mass_in_box": 0.5}},
        )
        for i in range(2)
    ]


FIGURES = {
    "category_bars_encoder": lambda out: plots.plot_category_bars(
        [r for r in _rows("benchmarks.json") if r["llm"] == "qwen2.5-1.5b"], out, x_key="vision_tower"
    ),
    "category_bars_llm": lambda out: plots.plot_category_bars(_rows("benchmarks.json"), out, x_key="llm"),
    "data_scaling": lambda out: plots.plot_data_scaling(_rows("benchmarks.json"), out),
    "linear_probe": lambda out: plots.plot_linear_probe(_rows("linear_probe.json"), out),
    "seg_recall": lambda out: plots.plot_seg_recall(_rows("seg_probe.json"), out),
    "alignment": lambda out: plots.plot_alignment(_rows("alignment.json"), out),
    "gradcam_grid": lambda out: plots.plot_gradcam_grid(_gradcam_samples(with_image=True), out),
    "gradcam_grid_maps_only": lambda out: plots.plot_gradcam_grid(_gradcam_samples(with_image=False), out),
}


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_figure_renders_png(name, tmp_path):
    out = tmp_path / "sub" / f"{name}.png"
    assert FIGURES[name](out) == out
    _assert_png(out)


def test_group_mean_std_matches_hand_computation():
    stats = plots.group_mean_std(_rows("seg_probe.json"), ["vision_tower", "loss_type"], "recall", scale=100)
    base_sft = stats[("siglip2-base", "sft")]
    assert base_sft.n == 2
    assert base_sft.mean == pytest.approx(41.0)
    assert base_sft.std == pytest.approx(math.sqrt(((40 - 41) ** 2 + (42 - 41) ** 2) / 1))
    assert stats[("siglip2-so400m", "dpo")].mean == pytest.approx(54.0)
    probe = plots.group_mean_std(_rows("linear_probe.json"), ["vision_tower", "loss_type"], "top1")
    assert ("siglip2-base", "base") in probe  # rows without loss_type are the original encoder


def test_order_values_sorts_by_one_size_rule():
    towers = ["siglip2-so400m", "siglip2-giant-opt", "siglip2-base", "siglip2-large"]
    assert plots.order_values(towers) == [
        "siglip2-base",
        "siglip2-large",
        "siglip2-so400m",
        "siglip2-giant-opt",
    ]
    llms = ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen2.5-0.5B-Instruct", "Qwen/Qwen2.5-1.5B-Instruct"]
    assert plots.order_values(llms) == [llms[1], llms[2], llms[0]]
    assert plots.order_values(["tower-x", "tower-a"]) == ["tower-x", "tower-a"]
    assert plots.order_losses(["dpo", "custom", "sft", "base"]) == ["base", "sft", "dpo", "custom"]
    assert plots.versus(["grpo", "dpo", "sft", "dpo"]) == "SFT vs DPO vs GRPO"
    assert plots.versus(["dpo (frozen tower)", "sft"]) == "SFT vs dpo (frozen tower)"


@pytest.mark.parametrize(
    "value, expected", [(20000, 20000.0), ("20K", 20000.0), ("1.5M", 1.5e6), ("300", 300.0)]
)
def test_data_size_number(value, expected):
    assert plots.data_size_number(value) == expected


def test_missing_key_raises_naming_row_and_key(tmp_path):
    rows = _rows("benchmarks.json")
    rows[2] = {k: v for k, v in rows[2].items() if k != "loss_type"}
    with pytest.raises(ValueError, match=r"row 2 \(sft-so400m-1.5b\) has no 'loss_type'"):
        plots.plot_category_bars(rows, tmp_path / "x.png")
    with pytest.raises(ValueError, match="no rows with method 'nope'"):
        plots.plot_linear_probe(_rows("linear_probe.json"), tmp_path / "y.png", method="nope")
    with pytest.raises(ValueError, match="data_size 'lots'"):
        plots.plot_data_scaling([{**rows[0], "data_size": "lots"}], tmp_path / "z.png")


def test_gradcam_grid_rejects_sample_without_maps(tmp_path):
    sample = plots.GradcamSample(id="s", image=None, maps={"mpo": np.ones((2, 2))})
    with pytest.raises(ValueError, match="has none of the maps"):
        plots.plot_gradcam_grid([sample], tmp_path / "g.png")


def test_gradcam_grid_rows_share_one_colour_scale(tmp_path, monkeypatch):
    import matplotlib.axes

    real_imshow = matplotlib.axes.Axes.imshow
    shown = []

    def recording_imshow(self, data, *args, **kwargs):
        shown.append((np.asarray(data).tolist(), kwargs.get("vmin"), kwargs.get("vmax")))
        return real_imshow(self, data, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "imshow", recording_imshow)
    sample = plots.GradcamSample("s", None, {"sft": np.array([[1.0, 2.0]]), "dpo": np.array([[4.0, 0.0]])})
    plots.plot_gradcam_grid([sample], tmp_path / "g.png")
    assert shown == [([[0.25, 0.5]], 0.0, 1.0), ([[1.0, 0.0]], 0.0, 1.0)]


def test_figure_titles_name_the_loss_types_drawn(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    real_suptitle = Figure.suptitle
    titles = []

    def recording_suptitle(self, text, *args, **kwargs):
        titles.append(text)
        return real_suptitle(self, text, *args, **kwargs)

    monkeypatch.setattr(Figure, "suptitle", recording_suptitle)
    rows = _rows("benchmarks.json")
    grpo = [
        {**row, "run": row["run"] + "-grpo", "loss_type": "grpo"} for row in rows if row["loss_type"] == "sft"
    ]
    plots.plot_category_bars(grpo + rows, tmp_path / "bars.png", x_key="llm")
    sample = plots.GradcamSample("s", None, {loss: np.ones((2, 2)) for loss in ("sft", "dpo", "grpo")})
    plots.plot_gradcam_grid([sample], tmp_path / "grid.png", loss_types=("sft", "dpo", "grpo"))
    assert titles == [
        "SFT vs DPO vs GRPO across llm",
        "Gradient maps on the vision tokens (SFT vs DPO vs GRPO)",
    ]


@pytest.fixture
def bar_heights(monkeypatch) -> list[tuple[float, str | None]]:
    """Every bar drawn: (height, legend label), recorded from matplotlib's Axes.bar."""
    import matplotlib.axes

    real_bar = matplotlib.axes.Axes.bar
    drawn: list[tuple[float, str | None]] = []

    def recording_bar(self, x, height, *args, **kwargs):
        drawn.append((float(height), kwargs.get("label")))
        return real_bar(self, x, height, *args, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "bar", recording_bar)
    return drawn


def test_seg_recall_draws_a_panel_per_feature_point(tmp_path, bar_heights):
    rows = [
        {"run": "sft", "loss_type": "sft", "vision_tower": "so16", "feature_point": point, "seed": s,
         "recall": recall + 0.001 * s}
        for point, recall in (("encoder", 0.30), ("projector", 0.60)) for s in range(3)
    ]  # fmt: skip
    _assert_png(plots.plot_seg_recall(rows, tmp_path / "seg.png"))
    # hand: mean of (30.0, 30.1, 30.2) and of (60.0, 60.1, 60.2); never their average 45.1
    assert [round(height, 6) for height, _ in bar_heights] == [30.1, 60.1]


def test_alignment_bars_keep_studies_of_different_towers_apart(tmp_path, bar_heights):
    rows = [
        {"run": v, "loss_type": v, "vision_tower": tower, "vision": v, "language": "gemma-2b",
         "metric": "mutual_knn", "k": 10, "seed": s, "score": base + (0.02 if v == "dpo" else 0.0)}
        for tower, base in (("b16", 0.10), ("so16", 0.20)) for v in ("sft", "dpo") for s in range(3)
    ]  # fmt: skip
    _assert_png(plots.plot_alignment(rows, tmp_path / "align.png"))
    assert sorted((label, round(h, 6)) for h, label in bar_heights) == [
        ("dpo (b16)", 0.12),
        ("dpo (so16)", 0.22),
        ("sft (b16)", 0.10),
        ("sft (so16)", 0.20),
    ]
