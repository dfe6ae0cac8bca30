"""analysis/summary.py: metrics.json rows carry their results file's top-level run labels (CONTRACTS §4)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.summary import main, summarize


def _gradcam_file(path: Path, run: str, entropy: float) -> None:
    path.parent.mkdir(parents=True)
    rows = [{"id": "s0", "loss_type": "dpo", "step": 20, "entropy": entropy, "map_npy": "m.npy"}]
    path.write_text(json.dumps({"kind": "gradcam", "run": run, "vision_tower": "so16", "rows": rows}))


def test_rows_take_the_file_level_labels(tmp_path):
    _gradcam_file(tmp_path / "gradcam" / "sft" / "gradcam.json", "sft", 0.9)
    _gradcam_file(tmp_path / "gradcam" / "dpo" / "gradcam.json", "dpo", 0.5)
    alignment = {"kind": "alignment", "llm": "1.5b",
                 "rows": [{"run": "a", "llm": "7b", "score": 0.2, "matrix": [[0.2]]}, {"run": "b", "score": 0.3}]}  # fmt: skip
    (tmp_path / "alignment.json").write_text(json.dumps(alignment))
    summary = summarize(tmp_path)
    by_run = {row["run"]: row for row in summary["gradcam"]}
    assert by_run["sft"]["entropy"] == 0.9 and by_run["dpo"]["entropy"] == 0.5
    assert all(row["vision_tower"] == "so16" and row["loss_type"] == "dpo" for row in summary["gradcam"])
    # a row's own label wins over the file's default; matrices are dropped
    assert summary["alignment"] == [
        {"llm": "7b", "run": "a", "score": 0.2},
        {"llm": "1.5b", "run": "b", "score": 0.3},
    ]
    assert summary["missing"] == ["training", "linear_probe", "seg_probe"]


def test_rows_that_are_not_objects_are_an_error_naming_the_file(tmp_path):
    (tmp_path / "seg.json").write_text(json.dumps({"kind": "seg_probe", "rows": [1, 2]}))
    with pytest.raises(ValueError, match=r"seg\.json: kind 'seg_probe' needs 'rows'"):
        main([str(tmp_path), "--out", str(tmp_path / "metrics.json")])
