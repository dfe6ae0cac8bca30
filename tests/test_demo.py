"""The main job in miniature (`make demo` → scripts/demo.sh) at DEMO_SCALE=smoke, end to end on CPU.

Checks what a user is promised: the report and every figure it links exist, it states a verdict for every
claim of the paper (DPO − SFT, and GRPO − SFT in rows of their own), the metrics JSON has every section with
the GRPO runs beside SFT and DPO in every analysis, the SFT, DPO and GRPO runs of one seed consumed the same
samples in the same order (and the two seeds different orders), and the encoders were exported in the
documented format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import demo_fixture
import pytest

demo_dir = demo_fixture.demo_dir  # the session fixture, shared with test_notebooks.py through a module cache

FIGURES = (
    "linear_probe.png",
    "seg_recall.png",
    "alignment.png",
    "gradcam_grid.png",
    "category_bars_encoder.png",
)
SECTIONS = ("training", "linear_probe", "seg_probe", "alignment", "gradcam", "benchmarks")
SEEDS = (0, 1)  # smoke scale: two Stage-2 seeds, no controls
LOSSES = ("sft", "dpo", "grpo")
STAGE2 = tuple(f"stage2/{loss}_s{seed}" for seed in SEEDS for loss in LOSSES)
RUNS = ("stage1_proj", "stage1_full", *STAGE2)


@pytest.mark.slow
def test_report_links_every_figure(demo_dir):
    report = (demo_dir / "report" / "report.md").read_text()
    assert "not the paper's result" in report
    claims = report.split("## Claims of the paper, seed by seed")[1].split("\n## ")[0]
    for claim in (
        "encoder probes",
        "segmentation",
        "Grad-CAM localisation",
        "vision-centric VQA",
        "alignment",
    ):
        for row in (claim, f"{claim} (GRPO)"):
            (line,) = [line for line in claims.splitlines() if line.startswith(f"| {row} |")]
            assert re.search(r"\| (reproduces|does not reproduce|cannot tell): [^|]+\|$", line), line
        # Grad-CAM: a GRPO group without reward variance has no gradient, so no mass in box to pair.
        assert "GRPO − SFT = " in line or "cannot tell: 0 paired seed(s)" in line, line
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert {Path(link).name for link in links} >= set(FIGURES)
    for link in links:
        figure = demo_dir / "report" / link
        assert figure.is_file() and figure.stat().st_size > 1000, link


@pytest.mark.slow
def test_metrics_json_has_every_section(demo_dir):
    metrics = json.loads((demo_dir / "metrics.json").read_text())
    assert metrics["missing"] == []
    for section in SECTIONS:
        assert metrics[section], section
    assert set(metrics["training"]) == set(RUNS)
    assert metrics["training"]["stage2/dpo_s0"]["loss_type"] == "dpo"
    assert metrics["training"]["stage2/dpo_s1"]["first_loss"] == pytest.approx(
        0.6931, abs=1e-3
    )  # policy = reference
    runs = {(row["run"], row["train_seed"]) for row in metrics["linear_probe"]}
    assert runs == {(run, seed) for run in ("original", "stage1", *LOSSES) for seed in SEEDS}
    for section, key in (("seg_probe", "run"), ("alignment", "vision")):
        assert {(row[key], row["train_seed"]) for row in metrics[section]} >= {
            (run, s) for run in LOSSES for s in SEEDS
        }
    world = [row for row in metrics["benchmarks"] if row.get("train_seed") is not None]
    assert {(row["run"], row["train_seed"]) for row in world} >= {(run, s) for run in LOSSES for s in SEEDS}
    assert {row["loss_type"] for row in metrics["gradcam"]} == set(LOSSES)
    assert metrics["training"]["stage2/grpo_s0"]["loss_type"] == "grpo"


@pytest.mark.slow
def test_sft_dpo_and_grpo_saw_the_same_samples_and_exported_their_encoders(demo_dir):
    ids = {}
    for run in STAGE2:
        lines = (demo_dir / run / "sample_order.jsonl").read_text().splitlines()
        ids[run] = [json.loads(line)["ids"] for line in lines]
        export = json.loads((demo_dir / run / "export.json").read_text())
        assert export["loss_type"] == Path(run).name.split("_")[0]
        assert (demo_dir / run / "vision_encoder" / "model.safetensors").is_file()
    for seed in SEEDS:
        assert ids[f"stage2/sft_s{seed}"] == ids[f"stage2/dpo_s{seed}"] == ids[f"stage2/grpo_s{seed}"]
        assert ids[f"stage2/sft_s{seed}"]
    assert ids["stage2/sft_s0"] != ids["stage2/sft_s1"], "the seeds should order the samples differently"
