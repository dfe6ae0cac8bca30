"""analysis/report.py: walks a results directory, draws what the inputs allow, writes report.md."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from analysis import plots
from analysis.report import build_report, collect_results, hold_others_fixed, load_gradcam_samples, main

FIXTURES = Path(__file__).parent / "fixtures" / "lmms_eval"
CAVEAT = "Miniature run of tiny random-initialised models, not the paper's result."
ALL_FIGURES = {
    "category_bars_encoder",
    "category_bars_llm",
    "data_scaling",
    "linear_probe",
    "gradcam_grid",
    "seg_recall",
    "alignment",
}


def _results_dir(root: Path) -> Path:
    """The fixture results plus the binary Grad-CAM inputs they name (maps and one image)."""
    results = root / "results"
    shutil.copytree(FIXTURES / "report_inputs", results)
    gradcam = results / "gradcam"
    (gradcam / "maps").mkdir()
    (gradcam / "images").mkdir()
    rng = np.random.default_rng(0)
    for sample in ("sample-1", "sample-2"):
        for loss in ("sft", "dpo"):
            np.save(gradcam / "maps" / f"{sample}_{loss}.npy", rng.random((6, 6)))
    Image.fromarray((rng.random((48, 48, 3)) * 255).astype(np.uint8)).save(
        gradcam / "images" / "sample-1.png"
    )
    return results


def _links(report: str) -> list[str]:
    return re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)


@pytest.fixture(scope="module")
def full_report(tmp_path_factory) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("report")
    path = build_report(_results_dir(root), root / "out", caveat=CAVEAT)
    return path, path.read_text()


def test_every_figure_is_drawn_and_linked(full_report):
    path, text = full_report
    links = _links(text)
    assert {Path(link).stem for link in links} == ALL_FIGURES
    for link in links:
        with Image.open(path.parent / link) as image:
            assert image.format == "PNG"
    assert "Figures skipped" not in text


def test_caveat_is_prominent_and_tables_are_embedded(full_report):
    _, text = full_report
    head = text.splitlines()[:4]
    assert any(CAVEAT in line and line.startswith("> **") for line in head)
    assert "| sft-base-1.5b | sft | siglip2-base | qwen2.5-1.5b | 20000 | 50.0 |" in text
    # seg probe: mean ± std over the two seeds, as percentages (hand: recalls 0.40 and 0.42)
    assert "| sft-b16 | sft | siglip2-base | 2 | 41.00 ± 1.41 |" in text
    # Grad-CAM: mean ± std (ddof 1) over the 2 samples; the file-level vision_tower, the same for every
    # row, is said once above the table instead of in a column
    gradcam = text.split("## Grad-CAM")[1]
    assert "Every row: vision_tower: `siglip2-so400m`." in gradcam
    assert "| dpo | 2 | 0.4950 ± 0.0354 | 3.7500 ± 0.2121 |" in gradcam
    assert "| siglip2-so400m |" not in gradcam


def test_sweeps_hold_the_other_labels_fixed(full_report):
    _, text = full_report
    assert "Category averages per vision_tower at llm = qwen2.5-1.5b, data_size = 20000." in text
    assert "Category averages per llm at vision_tower = siglip2-so400m, data_size = 20000." in text
    assert "against Stage-2 training samples at vision_tower = siglip2-so400m, llm = qwen2.5-1.5b." in text


def test_missing_inputs_are_listed_as_skipped(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "lmms_raw.json").write_text(json.dumps({"results": {}}))
    (results / "other.json").write_text(json.dumps({"kind": "something_else", "rows": []}))
    report = build_report(
        results,
        tmp_path / "out",
        lmms_eval_dirs=[FIXTURES / "runs"],
        labels=FIXTURES / "labels.yaml",
    )
    text = report.read_text()
    assert {Path(link).stem for link in _links(text)} == {"category_bars_encoder"}
    skipped = text.split("## Figures skipped for lack of inputs")[1]
    assert "Figure 3: SFT vs DPO across LLM sizes: only one llm" in skipped
    assert "Figures 4–5: data scaling: no benchmarks rows with loss_type and data_size" in skipped
    for kind in ("linear_probe", "gradcam", "seg_probe", "alignment"):
        assert f"no `{kind}` results files" in skipped
    assert "unknown kind 'something_else'" in text and "1 JSON file(s) without a `kind`" in text
    assert (tmp_path / "out" / "benchmarks.csv").is_file()
    assert "| dpo-so400m | dpo | siglip2-so400m | qwen2.5-1.5b | 60.5* |" in text
    assert "Caveat" not in text


def test_gradcam_reader_reshapes_flat_maps_and_names_missing_files(tmp_path):
    results = _results_dir(tmp_path)
    np.save(results / "gradcam" / "maps" / "sample-2_dpo.npy", np.arange(36.0))
    grouped, _ = collect_results(results)
    samples = {s.id: s for s in load_gradcam_samples(grouped["gradcam"])}
    assert samples["sample-2"].maps["dpo"].shape == (6, 6)
    assert samples["sample-2"].maps["dpo"][1, 0] == 6.0
    assert samples["sample-1"].image.shape == (48, 48, 3) and samples["sample-2"].image is None
    assert samples["sample-1"].stats["dpo"] == {"mass_in_box": 0.52, "entropy": 3.6}
    (results / "gradcam" / "maps" / "sample-1_sft.npy").unlink()
    with pytest.raises(FileNotFoundError, match=r"gradcam\.json row 0.*sample-1_sft\.npy"):
        load_gradcam_samples(grouped["gradcam"])


def test_cli_reads_caveat_file(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    shutil.copy(FIXTURES / "report_inputs" / "seg_probe.json", results)
    caveat = tmp_path / "caveat.txt"
    caveat.write_text(CAVEAT + "\n")
    assert main([str(results), str(tmp_path / "out"), "--caveat-file", str(caveat), "--title", "Demo"]) == 0
    text = (tmp_path / "out" / "report.md").read_text()
    assert text.startswith("# Demo\n\n> **⚠️ Caveat:** " + CAVEAT)
    assert "Figure 7: Grad-CAM, loss types: no `gradcam` results files" in text
    assert [Path(link).stem for link in _links(text)] == ["seg_recall"]


def test_figure_titles_name_every_loss_type_shown(tmp_path):
    """GRPO rows beside SFT and DPO: the titles of the loss-type figures name all three, in figure order."""
    results = _results_dir(tmp_path)
    for name in ("benchmarks.json", "gradcam/gradcam.json"):
        path = results / name
        doc = json.loads(path.read_text())
        grpo = [{**row, "loss_type": "grpo"} for row in doc["rows"] if row["loss_type"] == "sft"]
        for row in grpo:
            if "run" in row:
                row["run"] = row["run"].replace("sft", "grpo")
            if "map_npy" in row:
                row["map_npy"] = row["map_npy"].replace("_sft", "_grpo")
                shutil.copy(
                    path.parent / row["map_npy"].replace("_grpo", "_sft"), path.parent / row["map_npy"]
                )
        path.write_text(json.dumps({**doc, "rows": grpo + doc["rows"]}))
    text = build_report(results, tmp_path / "out").read_text()
    assert "### Figure 2: SFT vs DPO vs GRPO across encoder sizes" in text
    assert "### Figure 3: SFT vs DPO vs GRPO across LLM sizes" in text
    assert "### Figure 7: Grad-CAM, SFT vs DPO vs GRPO" in text
    assert text.count("SFT vs DPO") == text.count("SFT vs DPO vs GRPO")  # no title leaves GRPO out


def test_hold_others_fixed_keeps_unlabelled_rows():
    rows = [
        {"run": "base", "vision_tower": "b"},
        {"run": "sft", "vision_tower": "b", "llm": "1.5b", "loss_type": "sft"},
        {"run": "dpo", "vision_tower": "b", "llm": "1.5b", "loss_type": "dpo"},
        {"run": "dpo-small", "vision_tower": "b", "llm": "0.5b", "loss_type": "dpo"},
    ]
    kept, note = hold_others_fixed(rows, "vision_tower", ["vision_tower", "llm", "data_size"])
    assert [r["run"] for r in kept] == ["base", "sft", "dpo"]
    assert note == " at llm = 1.5b"
    assert hold_others_fixed(rows[:3], "vision_tower", ["llm"]) == (rows[:3], "")


def test_out_dir_must_not_contain_results_dir(tmp_path):
    with pytest.raises(ValueError, match="contains RESULTS_DIR"):
        build_report(tmp_path / "out" / "results", tmp_path / "out")


def test_gradcam_reader_keeps_the_latest_step_and_separates_runs(tmp_path):
    results = tmp_path / "results"
    (results / "maps").mkdir(parents=True)
    rows = []
    for run in ("sft-run", "dpo-run"):
        for step in (0, 20, 5):
            name = f"maps/{run}_{step}.npy"
            np.save(results / name, np.full((2, 2), float(step)))
            rows.append({"run": run, "id": "s1", "loss_type": "dpo", "step": step, "map_npy": name})
    (results / "gradcam.json").write_text(json.dumps({"kind": "gradcam", "rows": rows}))
    grouped, _ = collect_results(results)
    samples = {s.id: s for s in load_gradcam_samples(grouped["gradcam"])}
    assert set(samples) == {"sft-run: s1", "dpo-run: s1"}
    assert all(s.maps["dpo"][0, 0] == 20.0 for s in samples.values())
    rows.append(dict(rows[1]))
    (results / "gradcam.json").write_text(json.dumps({"kind": "gradcam", "rows": rows}))
    grouped, _ = collect_results(results)
    with pytest.raises(ValueError, match="second 'dpo' map for sample 's1' at step 20"):
        load_gradcam_samples(grouped["gradcam"])


def _write(path: Path, doc: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


def _section(text: str, title: str) -> str:
    return text.split(f"## {title}")[1].split("\n## ")[0]


def test_seg_probe_feature_points_stay_apart(tmp_path):
    """One run probed at the encoder (recall ~30 %) and after the projector (~60 %): never averaged."""
    results = tmp_path / "results"
    for point, recall in (("encoder", 0.30), ("projector", 0.60)):
        rows = [
            {"run": "sft", "loss_type": "sft", "vision_tower": "so16", "feature_point": point, "seed": s,
             "recall": recall + 0.001 * s, "micro_accuracy": 0.9, "precision": 0.5, "f1": 0.5}
            for s in range(3)
        ]  # fmt: skip
        _write(results / f"seg_{point}.json", {"kind": "seg_probe", "rows": rows})
    text = build_report(results, tmp_path / "out").read_text()
    table = _section(text, "Segmentation probe")
    # hand: recalls (30.0, 30.1, 30.2) -> 30.10 ± 0.10; (60.0, 60.1, 60.2) -> 60.10 ± 0.10
    assert "Every row: vision_tower: `so16`." in table
    assert "| sft | sft | encoder | 3 | 30.10 ± 0.10 |" in table
    assert "| sft | sft | projector | 3 | 60.10 ± 0.10 |" in table
    assert "Macro recall (%) per feature point" in table


def _alignment_rows(tower: str, base: float) -> list[dict]:
    return [
        {"run": v, "loss_type": v, "vision_tower": tower, "llm": "qwen2.5-1.5b", "vision": v, "language": "gemma-2b",
         "metric": "mutual_knn", "k": 10, "seed": s, "score": base + (0.02 if v == "dpo" else 0.0) + 0.01 * s,
         "vision_layer": 1, "language_layer": 2, "matrix": [[0.0]]}
        for v in ("sft", "dpo") for s in range(2)
    ]  # fmt: skip


def test_alignment_studies_of_different_towers_stay_apart(tmp_path, monkeypatch):
    """scripts/eval/alignment.sh names the models sft/dpo for every RUN_BASE: the towers must not merge."""
    results = tmp_path / "results"
    _write(
        results / "a" / "alignment.json", {"kind": "alignment", "rows": _alignment_rows("siglip2-b16", 0.10)}
    )
    _write(
        results / "b" / "alignment.json", {"kind": "alignment", "rows": _alignment_rows("siglip2-so16", 0.20)}
    )
    drawn: list[list[dict]] = []
    real = plots.plot_alignment

    def recording(rows, path, **kwargs):
        drawn.append(list(rows))
        return real(rows, path, **kwargs)

    monkeypatch.setattr(plots, "plot_alignment", recording)
    text = build_report(results, tmp_path / "out").read_text()
    table = _section(text, "Vision–language alignment")
    # hand: seeds score base + {0, 0.01} -> mean base + 0.005, std 0.01 / sqrt(2) = 0.0071
    assert "Every row: llm: `qwen2.5-1.5b`." in table
    for tower, sft in (("siglip2-b16", 0.105), ("siglip2-so16", 0.205)):
        for loss, mean in (("sft", sft), ("dpo", sft + 0.02)):
            row = f"| {loss} | {loss} | {tower} | {loss} | gemma-2b | mutual_knn | 10 | 2 |"
            assert f"{row} {mean:.4f} ± 0.0071 |" in table
    assert len(drawn) == 1 and len(drawn[0]) == 8


def test_gradcam_runs_of_two_run_bases_stay_apart(tmp_path):
    """Two RUN_BASE directories each with an `sft` run of the same sample at the same step."""
    results = tmp_path / "results"
    for tower, value in (("siglip2-b16", 1.0), ("siglip2-so16", 2.0)):
        folder = results / f"qwen2.5-1.5b_{tower}" / "sft"
        (folder / "maps").mkdir(parents=True)
        np.save(folder / "maps" / "s0_sft.npy", np.full((4, 4), value))
        rows = [{"id": "s0", "loss_type": "sft", "step": 20, "entropy": value, "mass_in_box": value / 4,
                 "map_npy": "maps/s0_sft.npy"}]  # fmt: skip
        _write(
            folder / "gradcam.json", {"kind": "gradcam", "run": "sft", "vision_tower": tower, "rows": rows}
        )
    grouped, _ = collect_results(results)
    samples = {s.id: s for s in load_gradcam_samples(grouped["gradcam"])}
    assert set(samples) == {"sft, siglip2-b16: s0", "sft, siglip2-so16: s0"}
    assert samples["sft, siglip2-so16: s0"].maps["sft"][0, 0] == 2.0
    text = build_report(results, tmp_path / "out").read_text()
    table = _section(text, "Grad-CAM")
    assert "| sft | siglip2-b16 | 20 | sft | 1 | 0.2500 | 1.0000 |" in table
    assert "| sft | siglip2-so16 | 20 | sft | 1 | 0.5000 | 2.0000 |" in table


def _probe_rows(layers: tuple[int | None, ...]) -> list[dict]:
    accuracy = {None: 0.70, 3: 0.30, 5: 0.50}
    return [
        {"run": loss, "loss_type": loss, "vision_tower": "so16", "llm": "1.5b", "feature_point": "encoder",
         "pooling": "mean", "layer": layer, "method": "logreg", "top1": accuracy[layer] + (0.02 if loss == "dpo" else 0)}
        for loss in ("sft", "dpo") for layer in layers
    ]  # fmt: skip


def test_linear_probe_figure_shows_one_layer(tmp_path, monkeypatch):
    """`--layers` adds rows at extra layers; Figure 6 shows the final layer (layer null), never a mix."""
    rows = _probe_rows((None, 3, 5, 5))
    kept, note = hold_others_fixed(rows, "vision_tower", ["llm", "pooling", "layer"])
    assert [(r["run"], r["layer"]) for r in kept] == [("sft", None), ("dpo", None)]
    assert note == " at layer = final"
    only_extra, note = hold_others_fixed(_probe_rows((3, 5, 5)), "vision_tower", ["layer"])
    assert {r["layer"] for r in only_extra} == {5} and note == " at layer = 5"
    assert hold_others_fixed(_probe_rows((None,)), "vision_tower", ["layer"])[1] == ""

    drawn: list[list[dict]] = []
    real = plots.plot_linear_probe

    def recording(chosen, path, **kwargs):
        drawn.append(list(chosen))
        return real(chosen, path, **kwargs)

    monkeypatch.setattr(plots, "plot_linear_probe", recording)
    _write(tmp_path / "results" / "linear_probe.json", {"kind": "linear_probe", "rows": rows})
    text = build_report(tmp_path / "results", tmp_path / "out").read_text()
    assert [r["top1"] for r in drawn[0]] == [0.70, 0.72]
    assert "Top-1 (%), method logreg at layer = final." in text
