"""Seed aggregation, paired differences and verdicts (analysis/claims.py) and their place in the report.

Fixture rows are written by hand with known numbers, so every mean, std, paired difference and
verdict below is checked against arithmetic done here.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from analysis import claims
from analysis.report import build_report
from analysis.results_rows import main as label_main
from analysis.results_rows import rows_with_file_labels

PROBE = {"feature_point": "encoder", "method": "logreg"}


def _probe_rows(top1: dict[tuple[str, int], list[float]]) -> list[dict]:
    """Linear-probe rows: (run, train seed) -> top-1 per probe repeat."""
    return [
        {"run": run, "train_seed": seed, "seed": i, "top1": value, **PROBE}
        for (run, seed), values in top1.items()
        for i, value in enumerate(values)
    ]


def _measure(name: str) -> claims.Measure:
    return next(m for m in claims.MEASURES if m.name == name)


ENCODER = "linear probe top-1 (%), encoder"


def test_repeats_average_before_seeds_and_differences_pair_by_seed():
    rows = _probe_rows(
        {
            ("sft", 0): [0.40, 0.50],  # 45 %
            ("sft", 1): [0.60],  # 60 %
            ("dpo", 0): [0.50],  # 50 %  -> paired diff +5
            ("dpo", 1): [0.70],  # 70 %  -> paired diff +10
            ("dpo_flipped", 0): [0.20],
            ("dpo_flipped", 1): [0.10],
            ("stage1", None): [0.30],  # measured once: pairs with every seed
            ("original", 0): [0.25],
            ("original", 1): [0.15],
        }
    )
    rows.append(
        {"run": "dpo", "train_seed": 0, "top1": 0.99, "feature_point": "projector", "method": "logreg"}
    )
    result = claims.evaluate(_measure(ENCODER), rows)
    assert list(result.conditions) == ["original", "stage1", "sft", "dpo", "dpo_flipped"]
    assert result.conditions["sft"].values == pytest.approx([45.0, 60.0])
    assert result.conditions["sft"].std == pytest.approx(math.sqrt(((45 - 52.5) ** 2 + (60 - 52.5) ** 2) / 1))
    assert result.effect.values == pytest.approx([5.0, 10.0])
    assert result.effect.mean == pytest.approx(7.5) and result.effect.std == pytest.approx(math.sqrt(12.5))
    assert result.differences["sign-flipped DPO − DPO"].values == pytest.approx([-30.0, -60.0])
    assert result.differences["Stage 1 − original tower"].values == pytest.approx([5.0, 15.0])
    assert "frozen-encoder DPO − DPO" not in result.differences
    assert result.conditions["sft"].text() == "52.50 ± 10.61 (n=2)"


@pytest.mark.parametrize(
    ("diffs", "expected"),
    [
        ([10.0, 10.5], "reproduces"),  # mean 10.25 > t(0.975, 1) * 0.354 / sqrt(2) = 3.18
        ([-10.0, -10.5], "does not reproduce"),
        ([5.0, 10.0], "cannot tell"),  # mean 7.5 < 12.71 * 3.54 / sqrt(2) = 31.8
        ([5.0, 6.0, 7.0], "reproduces"),  # mean 6 > t(0.975, 2) * 1 / sqrt(3) = 2.48
        ([5.0, -1.0], "cannot tell"),
        ([0.0, 0.0], "cannot tell"),  # a measure stuck at one value
        ([3.0, 3.0], "cannot tell"),  # no spread at all: no noise estimate, not a resolved effect
        ([9.0], "cannot tell"),  # one seed
    ],
)
def test_verdict_from_paired_differences(diffs, expected):
    assert claims.verdict(claims.Stat(diffs)).startswith(expected)
    assert claims.t_critical(2) == pytest.approx(12.706, abs=1e-3)


def test_zero_spread_pairs_are_floored_by_the_runs_own_seed_and_repeat_noise():
    # Paired differences 3 and 3 (spread 0), but the runs themselves move by 2 points between seeds.
    rows = _probe_rows({("sft", 0): [0.50], ("sft", 1): [0.52], ("dpo", 0): [0.53], ("dpo", 1): [0.55]})
    result = claims.evaluate(_measure(ENCODER), rows)
    assert result.effect.values == pytest.approx([3.0, 3.0]) and result.effect.std == pytest.approx(0.0)
    floor = claims.noise_floor(result)
    assert floor == pytest.approx(math.sqrt(2.0))  # std of (50, 52) and of (53, 55)
    text = claims.verdict(result.effect, floor)
    assert text.startswith("cannot tell") and "σ = 1.41" in text, text  # bar 12.71 * 1.41 / √2 = 12.7
    # Equal runs in both seeds but noisy probe repeats: the repeats' standard error is the floor.
    rows = _probe_rows(
        {
            ("sft", 0): [0.40, 0.60],
            ("sft", 1): [0.40, 0.60],
            ("dpo", 0): [0.43, 0.63],
            ("dpo", 1): [0.43, 0.63],
        }
    )
    result = claims.evaluate(_measure(ENCODER), rows)
    assert claims.noise_floor(result) == pytest.approx(math.sqrt(2 * 200 / 2))  # SE² = var/r = 200/2 per run
    assert claims.verdict(result.effect, claims.noise_floor(result)).startswith("cannot tell")
    # Nothing varies anywhere: no noise estimate, whatever the mean.
    rows = _probe_rows({("sft", 0): [0.5], ("sft", 1): [0.5], ("dpo", 0): [0.9], ("dpo", 1): [0.9]})
    result = claims.evaluate(_measure(ENCODER), rows)
    assert claims.verdict(result.effect, claims.noise_floor(result)).startswith("cannot tell: DPO − SFT = 40")
    # A large effect against a small floor still resolves.
    rows = _probe_rows({("sft", 0): [0.50], ("sft", 1): [0.51], ("dpo", 0): [0.80], ("dpo", 1): [0.81]})
    result = claims.evaluate(_measure(ENCODER), rows)
    assert claims.verdict(result.effect, claims.noise_floor(result)).startswith("reproduces")


def test_gradcam_pairs_by_sample_at_the_last_step_and_alignment_by_vision():
    rows = [
        {"id": sample, "loss_type": loss, "step": step, "mass_in_box": value}
        for sample, loss, step, value in [
            ("a", "SFT", 0, 0.9),  # an earlier step: ignored
            ("a", "SFT", 20, 0.2),
            ("a", "DPO", 20, 0.5),
            ("b", "SFT", 20, 0.3),
            ("b", "DPO", 20, 0.4),
        ]
    ]
    result = claims.evaluate(_measure("Grad-CAM mass in box (last step)"), rows)
    assert result.effect.values == pytest.approx([0.3, 0.1])
    alignment = [
        {"run": v, "vision": v, "train_seed": s, "seed": k, "score": score}
        for v, s, k, score in [("sft", 0, 0, 0.1), ("sft", 0, 1, 0.3), ("dpo", 0, 0, 0.25)]
    ]
    result = claims.evaluate(_measure("alignment (max over layer pairs)"), alignment)
    assert result.effect.values == pytest.approx([0.05])
    assert claims.verdict(result.effect).startswith("cannot tell: 1 paired seed(s)")


def _write(path: Path, doc: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))
    return path


def test_report_states_each_claim_and_labels_files_with_their_training_seed(tmp_path):
    results = tmp_path / "results"
    for seed, (sft, dpo) in enumerate([(0.40, 0.50), (0.41, 0.52)]):
        rows = [
            {"run": run, "seed": 0, "top1": value, **PROBE} for run, value in (("sft", sft), ("dpo", dpo))
        ]
        path = _write(results / f"seed{seed}" / "linear_probe.json", {"kind": "linear_probe", "rows": rows})
        label_main([str(path), "--set", f"train_seed={seed}"])
        assert rows_with_file_labels(path, json.loads(path.read_text()))[0]["train_seed"] == seed
    with pytest.raises(ValueError, match="unknown run label"):
        label_main([str(path), "--set", "colour=red"])
    bench_rows = [
        {"run": f"{run}_s{seed}", "train_seed": seed, "Vision-centric": score, "missing": []}
        for seed, pair in enumerate([(30.0, 30.0), (40.0, 40.0)])
        for run, score in zip(("sft", "dpo"), pair)
    ]
    for row in bench_rows:
        row["run"] = row["run"].split("_s")[0]
    _write(
        results / "bench" / "benchmarks.json", {"kind": "benchmarks", "suite": "world", "rows": bench_rows}
    )
    text = build_report(results, tmp_path / "report").read_text()
    claims_section = text.split("## Claims of the paper, seed by seed")[1].split("\n## ")[0]
    lines = {
        line.split("|")[1].strip(): line for line in claims_section.splitlines() if line.startswith("| ")
    }
    # σ = max(paired std 0.71, std of SFT 0.71, of DPO 1.41) = 1.41; bar 12.71 * 1.41 / √2 = 12.71
    assert (
        "cannot tell: DPO − SFT = 10.50 ± 0.71 (n=2) is within seed noise (σ = 1.41, abs(mean) > 12.71"
        in (lines["encoder probes"])
    )
    assert "cannot tell: DPO − SFT = 0.00 ± 0.00 (n=2) is within seed noise" in lines["vision-centric VQA"]
    assert "cannot tell: not measured in this run" in lines["segmentation"]
    assert "**DPO − SFT** (paired) | 10.50 ± 0.71 (n=2)" in text  # the linear-probe seed table


def test_grpo_gets_its_own_paired_difference_and_verdict_beside_dpo():
    """Appendix B (Table C): GRPO − SFT, paired by seed like DPO − SFT, with a verdict of its own."""
    rows = _probe_rows(
        {
            ("sft", 0): [0.40],
            ("sft", 1): [0.41],
            ("dpo", 0): [0.41],
            ("dpo", 1): [0.46],  # DPO − SFT = 1, 5: within seed noise (σ floored by DPO's spread 3.54)
            ("grpo", 0): [0.60],
            ("grpo", 1): [
                0.62
            ],  # GRPO − SFT = 20, 21: σ = GRPO's spread 1.41 -> 20.5 > 12.71 * 1.41 / sqrt(2)
        }
    )
    result = claims.evaluate(_measure(ENCODER), rows)
    assert list(result.conditions) == ["sft", "dpo", "grpo"]
    assert result.differences["GRPO − SFT"].values == pytest.approx([20.0, 21.0])
    table = claims.claims_table([result])
    lines = {line.split("|")[1].strip(): line for line in table.splitlines() if line.startswith("| ")}
    assert "cannot tell: DPO − SFT = 3.00 ± 2.83 (n=2) is within seed noise" in lines["encoder probes"]
    assert (
        "reproduces: GRPO − SFT = 20.50 ± 0.71 (n=2) (σ = 1.41, abs(mean) > 12.71)"
        in lines["encoder probes (GRPO)"]
    )
    assert "**GRPO − SFT** (paired) | 20.50 ± 0.71 (n=2)" in claims.seed_table([result])
    without = claims.evaluate(_measure(ENCODER), [row for row in rows if row["run"] != "grpo"])
    assert "GRPO" not in claims.claims_table([without]).split("\n", 2)[2]  # no GRPO row (the header names it)
    # GRPO measured elsewhere but not here (e.g. Grad-CAM maps without gradient): a row that cannot tell.
    assert "| segmentation (GRPO) |" not in table  # a claim not measured keeps its one row
    gradcam = [{"id": i, "loss_type": loss, "mass_in_box": 0.5} for i in "ab" for loss in ("sft", "dpo")]
    lines = claims.claims_table(
        [result, claims.evaluate(_measure("Grad-CAM mass in box (last step)"), gradcam)]
    )
    assert "cannot tell: 0 paired seed(s), need 2" in lines.split("| Grad-CAM localisation (GRPO) |")[1]
