"""Cambrian-16 aggregation of lmms-eval results (analysis/benchmarks.py) against hand-computed numbers.

The fixture runs under tests/fixtures/lmms_eval/runs are hand-written lmms-eval outputs:
- qwen-siglip-dpo: lmms-eval 0.7 keys, DocVQA absent, per-sample logs in the 0.6+ format (metric
  dicts with ``source``/``index``/``is_correct``);
- qwen-siglip-sft: old MME spelling, RealWorldQA without the flexible-extract filter, results split
  over two files, per-sample logs in the older format (``doc.source``, ``doc_id``, 0/1 values).
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest

from analysis.benchmark_samples import RECOMPUTERS, mmvp_pair_accuracy, read_samples, source_accuracies
from analysis.benchmarks import BenchmarkKeyError, aggregate, load_registry, main, write_outputs

FIXTURES = Path(__file__).parent / "fixtures" / "lmms_eval"
RUNS = FIXTURES / "runs"
DPO_DIR = RUNS / "qwen-siglip-dpo"
DPO_CV_SAMPLES = DPO_DIR / "2025-01-02T10-00-00.000000_samples_cv_bench.jsonl"

# Hand-computed from the fixture files (native value → 0–100).
DPO_EXPECTED = {
    "MME-P": 1500 / 20,
    "MMBench": 70.0,
    "SEED-I": 65.0,
    "GQA": 60.0,
    "SQA-I": 80.0,
    "MMMU-val": 40.0,
    "MathVista-testmini": 50.0,
    "AI2D": 70.0,
    "ChartQA": 60.0,
    "OCRBench": 50.0,
    "TextVQA": 70.0,
    "MMVP": 75.0,  # pairs (0,1) (2,3) (6,7) right, (4,5) not: 3/4
    "RealWorldQA": 55.0,
    "CV-Bench-2D": 62.5,  # ADE20K 3/4, COCO 1/2 -> (0.75 + 0.5) / 2; pooled 2D accuracy would be 4/6
    "CV-Bench-3D": 25.0,  # Omni3D 1/4
}
SFT_EXPECTED = {
    "MME-P": 1400 / 20,
    "MMBench": 66.0,
    "SEED-I": 62.0,
    "GQA": 58.0,
    "SQA-I": 78.0,
    "MMMU-val": 38.0,
    "MathVista-testmini": 46.0,
    "AI2D": 66.0,
    "ChartQA": 56.0,
    "OCRBench": 48.0,
    "TextVQA": 66.0,
    "DocVQA": 70.0,
    "MMVP": 50.0,  # pairs (0,1) and (6,7) right of 4
    "RealWorldQA": 50.0,
    "CV-Bench-2D": 50.0,  # ADE20K 2/4, COCO 1/2
    "CV-Bench-3D": 50.0,  # Omni3D 2/4
}


@pytest.fixture(scope="module")
def scored():
    return {result.run: result for result in aggregate([RUNS])}


def _write_results(run_dir: Path, results: dict, stamp: str = "2025-02-01T00-00-00.000000") -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / f"{stamp}_results.json"
    path.write_text(json.dumps({"results": results, "config": {}}), encoding="utf-8")
    return path


def test_dpo_run_matches_hand_computed_scores_and_excludes_missing(scored):
    result = scored["qwen-siglip-dpo"]
    assert result.scores["DocVQA"] is None
    assert {k: v for k, v in result.scores.items() if k != "DocVQA"} == pytest.approx(DPO_EXPECTED)
    assert result.categories == pytest.approx(
        {
            "General": (75 + 70 + 65 + 60) / 4,
            "Knowledge": (80 + 40 + 50 + 70) / 4,
            "OCR & Chart": (60 + 50 + 70) / 3,  # DocVQA left out, not counted as 0
            "Vision-centric": (75 + 55 + 62.5 + 25) / 4,
        }
    )
    assert result.average == pytest.approx(907.5 / 15)
    assert result.missing == ["DocVQA"]
    assert any("DocVQA missing" in w and "docvqa_val" in w for w in result.warnings)
    assert any("averages exclude" in w and "DocVQA" in w for w in result.warnings)


def test_sft_run_reads_aliases_split_files_and_old_sample_logs(scored):
    result = scored["qwen-siglip-sft"]
    assert result.scores == pytest.approx(SFT_EXPECTED)
    assert result.categories == pytest.approx(
        {"General": 64.0, "Knowledge": 57.0, "OCR & Chart": 60.0, "Vision-centric": 50.0}
    )
    assert result.average == pytest.approx(924 / 16)
    assert result.missing == []
    assert any("8 of 300" in w for w in result.warnings)


def test_cv_bench_2d_is_the_mean_of_source_accuracies():
    samples = read_samples(DPO_CV_SAMPLES)
    assert source_accuracies(samples, "cv_bench_acc", DPO_CV_SAMPLES) == pytest.approx(
        {"ADE20K": 0.75, "COCO": 0.5, "Omni3D": 0.25}
    )
    value, notes = RECOMPUTERS["cv_bench_2d"](samples, "cv_bench_acc", DPO_CV_SAMPLES)
    assert value == pytest.approx(0.625) and notes == []
    without_coco = [s for s in samples if s["cv_bench_acc"]["source"] != "COCO"]
    value, notes = RECOMPUTERS["cv_bench_2d"](without_coco, "cv_bench_acc", DPO_CV_SAMPLES)
    assert value is None and "COCO" in notes[0]


def _mmvp_lines(path: Path, flags: dict[int, int]) -> Path:
    path.write_text(
        "".join(json.dumps({"doc_id": i, "mmvp_pair_accuracy": f}) + "\n" for i, f in flags.items())
    )
    return path


def test_mmvp_pairs_need_both_questions_and_incomplete_pairs_are_reported(tmp_path):
    path = _mmvp_lines(tmp_path / "s.jsonl", {0: 1, 1: 1, 2: 1, 3: 0, 4: 1})
    value, notes = mmvp_pair_accuracy(read_samples(path), "mmvp_pair_accuracy", path)
    assert value == pytest.approx(1 / 2)  # pair (0,1) right, (2,3) wrong, question 4 has no partner
    assert any("one question only" in n and "[2]" in n for n in notes)
    duplicate = tmp_path / "d.jsonl"
    duplicate.write_text(path.read_text() + json.dumps({"doc_id": 1, "mmvp_pair_accuracy": 1}) + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        mmvp_pair_accuracy(read_samples(duplicate), "mmvp_pair_accuracy", duplicate)


def test_cv_bench_without_per_sample_log_is_missing_not_zero(tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(DPO_DIR, run_dir)
    next(run_dir.glob("*_samples_cv_bench.jsonl")).unlink()
    (result,) = aggregate([run_dir])
    assert result.scores["CV-Bench-2D"] is None and result.scores["CV-Bench-3D"] is None
    assert result.categories["Vision-centric"] == pytest.approx((75 + 55) / 2)
    assert any("--log_samples" in w and "CV-Bench-2D" in w for w in result.warnings)


def test_unexpected_metric_key_names_task_file_and_available_keys(tmp_path):
    results_file = _write_results(tmp_path / "run", {"gqa": {"alias": "gqa", "accuracy,none": 0.5}})
    with pytest.raises(BenchmarkKeyError) as error:
        aggregate([tmp_path / "run"])
    message = str(error.value)
    assert "'gqa'" in message and str(results_file) in message and "accuracy,none" in message


def test_registry_override_accepts_another_versions_names(tmp_path):
    _write_results(
        tmp_path / "run", {"gqa_new": {"accuracy,none": 0.5}, "mme": {"mme_perception_score,none": 1000}}
    )
    override = tmp_path / "override.yaml"
    override.write_text("GQA: {task: gqa_new, metric_keys: 'accuracy,none'}\n")
    (result,) = aggregate([tmp_path / "run"], registry=load_registry(override))
    assert result.scores["GQA"] == pytest.approx(50.0)
    assert result.categories["General"] == pytest.approx((50.0 + 50.0) / 2)
    assert result.average == pytest.approx(50.0)
    assert len(result.missing) == 14


@pytest.mark.parametrize(
    "override, match",
    [
        ({"GQB": {"task": "x"}}, "unknown benchmark"),
        ({"GQA": {"category": "Knowledge"}}, "must map to a dict"),
        ({"GQA": {"scale": 10}}, "scale must be 1, 100 or 2000"),
        ({"GQA": {"metric_keys": ["exact_match"]}}, "metric,filter"),
    ],
)
def test_registry_override_rejects_bad_entries(override, match):
    with pytest.raises(ValueError, match=match):
        load_registry(override)


def test_value_outside_the_registry_scale_raises(tmp_path):
    _write_results(tmp_path / "run", {"mmbench_en_dev": {"gpt_eval_score,none": 70.0}})
    with pytest.raises(ValueError, match="outside the registry scale 0–1"):
        aggregate([tmp_path / "run"], registry=load_registry({"MMBench": {"scale": 1}}))


def test_non_numeric_score_is_missing_with_a_warning(tmp_path):
    _write_results(tmp_path / "run", {"mathvista_testmini_format": {"llm_as_judge_eval,none": None}})
    (result,) = aggregate([tmp_path / "run"])
    assert result.scores["MathVista-testmini"] is None
    assert any("MathVista-testmini missing" in w and "None" in w for w in result.warnings)


def test_outputs_mark_missing_entries_and_partial_averages(tmp_path, scored):
    paths = write_outputs([scored["qwen-siglip-dpo"], scored["qwen-siglip-sft"]], tmp_path)
    with paths["csv"].open(newline="") as handle:
        rows = {row["run"]: row for row in csv.DictReader(handle)}
    assert rows["qwen-siglip-dpo"]["DocVQA"] == "" and rows["qwen-siglip-dpo"]["missing"] == "DocVQA"
    assert float(rows["qwen-siglip-dpo"]["Average"]) == pytest.approx(60.5)
    assert float(rows["qwen-siglip-sft"]["MME-P"]) == pytest.approx(70.0)
    markdown = paths["md"].read_text()
    dpo_line = next(line for line in markdown.splitlines() if line.startswith("| qwen-siglip-dpo"))
    assert "| – |" in dpo_line and "| 60.5* |" in dpo_line and "| 60.0* |" in dpo_line
    assert "**Warnings**" in markdown and "DocVQA missing" in markdown
    doc = json.loads(paths["json"].read_text())
    assert doc["kind"] == "benchmarks"
    assert doc["rows"][0]["DocVQA"] is None and doc["rows"][0]["MME-P"] == pytest.approx(75.0)
    assert doc["rows"][1]["Vision-centric"] == pytest.approx(50.0)
    assert doc["categories"]["OCR & Chart"] == ["ChartQA", "OCRBench", "TextVQA", "DocVQA"]


def test_cli_applies_labels_and_writes_outputs(tmp_path, capsys):
    assert main([str(RUNS), "--out-dir", str(tmp_path), "--labels", str(FIXTURES / "labels.yaml")]) == 0
    rows = json.loads((tmp_path / "benchmarks.json").read_text())["rows"]
    assert [(r["run"], r["loss_type"], r["vision_tower"]) for r in rows] == [
        ("dpo-so400m", "dpo", "siglip2-so400m"),
        ("sft-so400m", "sft", "siglip2-so400m"),
    ]
    assert "| dpo-so400m | dpo |" in capsys.readouterr().out


def test_labels_for_an_unknown_run_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown run"):
        aggregate([RUNS], labels={"no-such-run": {"loss_type": "dpo"}})


def test_directory_without_results_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="_results.json"):
        aggregate([tmp_path])


def test_a_run_label_may_repeat_only_where_another_label_differs(tmp_path):
    world = {"world_colour_choice": {"acc,none": 0.5}}
    for name in ("a", "b"):
        _write_results(tmp_path / name / "model", world)
    seeds = {str(tmp_path / n / "model"): {"run": "dpo", "train_seed": s} for n, s in (("a", 0), ("b", 1))}
    rows = aggregate([tmp_path / "a", tmp_path / "b"], labels=seeds, registry=load_registry(suite="world"))
    assert [(r.run, r.labels["train_seed"], r.scores["Colour (forced choice)"]) for r in rows] == [
        ("dpo", 0, 50.0),
        ("dpo", 1, 50.0),
    ]
    same = {key: {"run": "dpo", "train_seed": 0} for key in seeds}
    with pytest.raises(ValueError, match=r"run labels \['dpo'\] are not unique"):
        aggregate([tmp_path / "a", tmp_path / "b"], labels=same)
