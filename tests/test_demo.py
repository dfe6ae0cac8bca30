"""The main job in miniature (`make demo` → scripts/demo.sh) at DEMO_SCALE=smoke, end to end on CPU.

Checks what a user is promised: the report and every figure it links exist, the metrics JSON has every
section, the SFT and DPO runs consumed the same samples in the same order, and both encoders were
exported in the documented format.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import demo_fixture
import pytest

demo_dir = demo_fixture.demo_dir  # the session fixture, shared with test_notebooks.py through a module cache

FIGURES = ("linear_probe.png", "seg_recall.png", "alignment.png", "gradcam_grid.png")
SECTIONS = ("training", "linear_probe", "seg_probe", "alignment", "gradcam")
RUNS = ("stage1_proj", "stage1_full", "stage2_sft", "stage2_dpo")


@pytest.mark.slow
def test_report_links_every_figure(demo_dir):
    report = (demo_dir / "report" / "report.md").read_text()
    assert "not the paper's result" in report
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
    assert metrics["training"]["stage2_dpo"]["loss_type"] == "dpo"
    assert metrics["training"]["stage2_dpo"]["first_loss"] == pytest.approx(
        0.6931, abs=1e-3
    )  # policy = reference
    runs = {row["run"] for row in metrics["linear_probe"]}
    assert runs == {"stage1", "sft", "dpo"}


@pytest.mark.slow
def test_sft_and_dpo_saw_the_same_samples_and_exported_their_encoders(demo_dir):
    orders = {
        loss: (demo_dir / f"stage2_{loss}" / "sample_order.jsonl").read_text().splitlines()
        for loss in ("sft", "dpo")
    }
    ids = {loss: [json.loads(line)["ids"] for line in lines] for loss, lines in orders.items()}
    assert ids["sft"] == ids["dpo"] and ids["sft"]
    for loss in ("sft", "dpo"):
        export = json.loads((demo_dir / f"stage2_{loss}" / "export.json").read_text())
        assert export["loss_type"] == loss
        assert (demo_dir / f"stage2_{loss}" / "vision_encoder" / "model.safetensors").is_file()
