"""Build the results report: every figure the results allow, plus report.md with tables and links.

``python -m analysis.report RESULTS_DIR OUT_DIR`` walks RESULTS_DIR recursively for results JSON
files (docs/CONTRACTS.md §4: a top-level ``kind`` and ``rows``), groups them by kind, draws each of
the paper's figure types whose inputs exist (analysis/plots.py) into OUT_DIR/figures/, and writes
OUT_DIR/report.md: an optional prominent caveat, the paper's claims one by one with paired DPO − SFT
(and, where GRPO was run, GRPO − SFT) differences over training seeds, controls and a computed verdict
(analysis/claims.py), the tables (benchmarks, linear probe, segmentation probe, alignment, Grad-CAM;
each led by its seed table of mean ± std and paired differences), links to the figures, titled by the
loss types they compare ("SFT vs DPO vs GRPO"), and the figure types skipped with the reason.

Optionally ``--lmms_eval DIR`` aggregates raw lmms-eval output first (analysis/benchmarks.py, which
also writes benchmarks.{csv,md,json} into OUT_DIR). JSON files without a ``kind`` (lmms-eval raw
results, export.json, configs) are counted and otherwise not read; OUT_DIR itself is not walked.

Grad-CAM rows (kind ``gradcam``) are read with their ``map_npy`` (a patch grid ``[h, w]``, or a
flat ``h*w`` square) and, when present, ``image``; both paths are relative to the results file's
directory unless absolute. A row without ``image`` is drawn as the map alone.

Rows keep their run labels (``run``, ``vision_tower``, ``llm``, ``data_size``, ``seed``; file-level
labels are defaults, analysis/results_rows.py) in every table and figure grouping, so results of
several studies under one RESULTS_DIR (e.g. one ``RUN_BASE`` per encoder) never average together.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from analysis import claims, plots
from analysis.benchmarks import (
    aggregate,
    load_labels,
    load_registry,
    markdown_table,
    write_outputs,
)
from analysis.results_rows import RUN_LABEL_KEYS, rows_with_file_labels

logger = logging.getLogger(__name__)

KINDS: tuple[str, ...] = ("benchmarks", "linear_probe", "seg_probe", "alignment", "gradcam")
GRADCAM_MAX_SAMPLES = 8
# A Grad-CAM sample is one image of one run; its loss types are the figure's columns.
GRADCAM_SAMPLE_KEYS: tuple[str, ...] = tuple(k for k in RUN_LABEL_KEYS if k != "loss_type")
# Settings of an alignment study besides the run labels (pool, num_samples, outlier_clamp).
ALIGNMENT_SETTINGS: tuple[str, ...] = tuple(k for k in plots.ALIGNMENT_STUDY_KEYS if k not in RUN_LABEL_KEYS)
# Sweep keys whose missing value is a setting of its own: a linear-probe row without `layer` (null)
# probed the encoder's final layer; `--layers` adds rows at other layers.
MISSING_MEANS: dict[str, str] = {"layer": "final"}


@dataclass
class ResultsFile:
    """One results JSON file of a known kind; its rows carry the file-level labels too."""

    path: Path
    kind: str
    rows: list[dict[str, Any]]
    doc: dict[str, Any]


@dataclass
class FigureOutcome:
    """A figure type: the PNG written, or why it was skipped."""

    title: str
    kind: str
    path: Path | None = None
    caption: str = ""
    skipped: str | None = None


class Skip(Exception):
    """The inputs do not allow this figure; the message says why."""


def collect_results(
    results_dir: Path, exclude: Path | None = None
) -> tuple[dict[str, list[ResultsFile]], list[str]]:
    """Results files under ``results_dir`` grouped by kind, and notes on the files not used."""
    results_dir = Path(results_dir)
    if not results_dir.is_dir():
        raise FileNotFoundError(f"{results_dir}: results directory does not exist")
    skip_root = Path(exclude).resolve() if exclude is not None else None
    grouped: dict[str, list[ResultsFile]] = {kind: [] for kind in KINDS}
    notes: list[str] = []
    without_kind = 0
    for path in sorted(results_dir.rglob("*.json")):
        if skip_root is not None and path.resolve().is_relative_to(skip_root):
            continue
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: not valid JSON ({exc})") from exc
        if not isinstance(doc, dict) or "kind" not in doc:
            without_kind += 1
            continue
        if doc["kind"] not in grouped:
            notes.append(f"`{path}`: unknown kind {doc['kind']!r}, not read (known: {', '.join(KINDS)})")
            continue
        grouped[doc["kind"]].append(ResultsFile(path, doc["kind"], rows_with_file_labels(path, doc), doc))
    if without_kind:
        notes.append(
            f"{without_kind} JSON file(s) without a `kind` (e.g. raw lmms-eval output, configs) not read"
        )
    return grouped, notes


def _load_grid(path: Path, where: str) -> np.ndarray:
    if not path.is_file():
        raise FileNotFoundError(f"{where}: Grad-CAM map {path} does not exist")
    grid = np.squeeze(np.load(path))
    if grid.ndim == 1:
        side = math.isqrt(grid.size)
        if side * side != grid.size:
            raise ValueError(f"{where}: flat map {path} of {grid.size} values is not a square patch grid")
        grid = grid.reshape(side, side)
    if grid.ndim != 2:
        raise ValueError(f"{where}: map {path} has shape {grid.shape}; expected a [h, w] patch grid")
    return grid


def _label_value(row: dict[str, Any], key: str) -> str:
    return "" if row.get(key) is None else str(row[key])


def _varying(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    """The keys that take more than one (non-missing) value across ``rows``."""
    return [k for k in keys if len({str(r[k]) for r in rows if r.get(k) is not None}) > 1]


def load_gradcam_samples(files: Sequence[ResultsFile]) -> list[plots.GradcamSample]:
    """Group gradcam rows by (run labels, sample id): load each loss type's map and the sample's image.

    The run labels (``GRADCAM_SAMPLE_KEYS``) keep samples of different runs apart even where two
    runs share a name (e.g. ``sft`` under two ``RUN_BASE`` directories); a sample is named by its
    run and by every other label that differs between the rows. Protocol runs log several training
    steps per (sample, loss); the figure shows the latest step (the paper looks around step 20). Two
    maps at the same step for one (run labels, sample, loss) are an error.
    """
    rows = [(file, index, row) for file in files for index, row in enumerate(file.rows)]
    varying = set(_varying([row for _, _, row in rows], GRADCAM_SAMPLE_KEYS))
    samples: dict[tuple[str, ...], plots.GradcamSample] = {}
    steps: dict[tuple[str, ...], float] = {}
    for file, index, row in rows:
        where = f"{file.path} row {index}"
        for key in ("id", "loss_type", "map_npy"):
            if row.get(key) is None:
                raise ValueError(f"{where}: gradcam row has no {key!r}")
        shown = [
            str(row[k])
            for k in GRADCAM_SAMPLE_KEYS
            if row.get(k) is not None and (k == "run" or k in varying)
        ]
        label = f"{', '.join(shown)}: {row['id']}" if shown else str(row["id"])
        key = (*(_label_value(row, k) for k in GRADCAM_SAMPLE_KEYS), str(row["id"]))
        sample = samples.setdefault(key, plots.GradcamSample(label, None, {}))
        loss = str(row["loss_type"]).lower()
        step = float(row.get("step") or 0)
        previous = steps.get((*key, loss))
        if previous is not None and step == previous:
            raise ValueError(
                f"{where}: second {loss!r} map for sample {row['id']!r} at step {step:g} ({label})"
            )
        if previous is not None and step < previous:
            continue
        steps[(*key, loss)] = step
        sample.maps[loss] = _load_grid(file.path.parent / str(row["map_npy"]), where)
        sample.stats[loss] = {k: float(row[k]) for k in ("mass_in_box", "entropy") if row.get(k) is not None}
        if sample.image is None and row.get("image"):
            image_path = file.path.parent / str(row["image"])
            if not image_path.is_file():
                raise FileNotFoundError(f"{where}: image {image_path} does not exist")
            with Image.open(image_path) as image:
                sample.image = np.asarray(image.convert("RGB"))
    return list(samples.values())


def _most_common(rows: Sequence[dict[str, Any]], key: str) -> Any:
    counts = Counter(row[key] for row in rows if row.get(key) is not None)
    return counts.most_common(1)[0][0] if counts else None


def hold_others_fixed(
    rows: list[dict[str, Any]],
    vary: str,
    fixed: Sequence[str],
    missing_means: Mapping[str, str] | None = None,
) -> tuple[list[dict[str, Any]], str]:
    """Keep the rows at the most common value of each other sweep key, so one figure varies one thing.

    Rows without the key (e.g. the original encoder has no ``llm``) are kept, except for the keys
    of ``missing_means`` (default ``MISSING_MEANS``): there a missing value is a setting of its own,
    named by the mapping (``{"layer": "final"}``: a linear-probe row without ``layer`` probed the
    final layer), and the rows are held at that setting whenever some rows have it, else at the
    most common value.
    """
    missing_means = MISSING_MEANS if missing_means is None else missing_means
    described = []
    for key in fixed:
        if key == vary:
            continue
        values = {str(r[key]) for r in rows if r.get(key) is not None}
        if key in missing_means and values and any(r.get(key) is None for r in rows):
            rows = [r for r in rows if r.get(key) is None]
            described.append(f"{key} = {missing_means[key]}")
            continue
        if len(values) < 2:
            continue
        value = _most_common(rows, key)
        rows = [r for r in rows if r.get(key) is None or r.get(key) == value]
        described.append(f"{key} = {value}")
    return rows, (" at " + ", ".join(described)) if described else ""


def _labelled(rows: Sequence[dict[str, Any]], keys: Sequence[str], what: str) -> list[dict[str, Any]]:
    chosen = [row for row in rows if all(row.get(k) is not None for k in keys)]
    if not chosen:
        raise Skip(f"no {what} rows with {' and '.join(keys)}")
    return chosen


def _sweep_rows(rows: Sequence[dict[str, Any]], x_key: str, other: str) -> tuple[list[dict[str, Any]], str]:
    chosen = _labelled(rows, ["loss_type", x_key], "benchmarks")
    distinct_x = sorted({str(r[x_key]) for r in chosen})
    distinct_other = {str(r.get(other)) for r in rows if r.get(other) is not None}
    # One value of each: the encoder figure alone compares the loss types; the LLM figure would repeat it.
    redundant = len(distinct_other) >= 2 if x_key == "vision_tower" else bool(distinct_other)
    if len(distinct_x) < 2 and redundant:
        raise Skip(f"only one {x_key} ({', '.join(distinct_x)}); the {other} figure covers it")
    return hold_others_fixed(chosen, x_key, ["vision_tower", "llm", "data_size"])


def _compared(rows: Sequence[dict[str, Any]]) -> str:
    """The loss types of ``rows`` as a title names them ("SFT vs DPO vs GRPO"); "loss types" without any."""
    losses = [plots.loss_label(row) for row in rows if row.get("loss_type") is not None]
    return plots.versus(losses) if losses else "loss types"


def _figure_plan(
    grouped: dict[str, list[ResultsFile]],
) -> list[tuple[str, str, str, Callable[[Path], tuple[Path, str]]]]:
    """(file name, title, kind, draw) per figure type; titles name the loss types the results hold."""
    rows = {kind: [row for file in files for row in file.rows] for kind, files in grouped.items()}
    benchmarks = _compared(rows["benchmarks"])

    def category_bars(x_key: str, other: str) -> Callable[[Path], tuple[Path, str]]:
        def draw(path: Path) -> tuple[Path, str]:
            chosen, note = _sweep_rows(rows["benchmarks"], x_key, other)
            return plots.plot_category_bars(
                chosen, path, x_key=x_key
            ), f"Category averages per {x_key}{note}."

        return draw

    def scaling(path: Path) -> tuple[Path, str]:
        chosen = _labelled(rows["benchmarks"], ["loss_type", "data_size"], "benchmarks")
        if len({str(r["data_size"]) for r in chosen}) < 2:
            raise Skip("fewer than two data_size values")
        chosen, note = hold_others_fixed(chosen, "data_size", ["vision_tower", "llm"])
        return plots.plot_data_scaling(chosen, path), f"Scores against Stage-2 training samples{note}."

    def linear_probe(path: Path) -> tuple[Path, str]:
        chosen = _labelled(rows["linear_probe"], ["vision_tower", "feature_point", "top1"], "linear_probe")
        methods = [str(r.get("method")) for r in chosen]
        method = "logreg" if "logreg" in methods else methods[0]
        # One probed layer per figure: the final layer (rows without `layer`) unless only --layers ran.
        chosen, note = hold_others_fixed(chosen, "vision_tower", ["llm", "data_size", "pooling", "layer"])
        return plots.plot_linear_probe(chosen, path, method=method), f"Top-1 (%), method {method}{note}."

    def seg_recall(path: Path) -> tuple[Path, str]:
        chosen = _labelled(rows["seg_probe"], ["vision_tower", "recall"], "seg_probe")
        chosen, note = hold_others_fixed(chosen, "vision_tower", ["llm", "data_size"])
        caption = f"Macro recall (%) per feature point, mean ± std over seeds{note}."
        return plots.plot_seg_recall(chosen, path), caption

    def alignment(path: Path) -> tuple[Path, str]:
        chosen = _labelled(rows["alignment"], ["vision", "language", "metric", "score"], "alignment")
        spread = "mean ± std over seeds" if len({r.get("seed") for r in chosen}) > 1 else "one seed (no std)"
        # Bars are (vision, study labels) pairs: plots.ALIGNMENT_STUDY_KEYS tell studies apart.
        return plots.plot_alignment(chosen, path), f"Max alignment over layer pairs, {spread}."

    def gradcam(path: Path) -> tuple[Path, str]:
        if not grouped["gradcam"]:
            raise Skip("no gradcam results")
        samples = load_gradcam_samples(grouped["gradcam"])
        shown = samples[:GRADCAM_MAX_SAMPLES]
        losses = plots.order_losses([loss for s in shown for loss in s.maps])
        note = f" First {len(shown)} of {len(samples)} samples." if len(samples) > len(shown) else ""
        return plots.plot_gradcam_grid(shown, path, loss_types=losses), "Gradient-magnitude maps." + note

    return [
        (
            "category_bars_encoder",
            f"Figure 2: {benchmarks} across encoder sizes",
            "benchmarks",
            category_bars("vision_tower", "llm"),
        ),
        (
            "category_bars_llm",
            f"Figure 3: {benchmarks} across LLM sizes",
            "benchmarks",
            category_bars("llm", "vision_tower"),
        ),
        ("data_scaling", "Figures 4–5: data scaling", "benchmarks", scaling),
        ("linear_probe", "Figure 6: linear probe vs model size", "linear_probe", linear_probe),
        ("gradcam_grid", f"Figure 7: Grad-CAM, {_compared(rows['gradcam'])}", "gradcam", gradcam),
        ("seg_recall", "Figure 8: segmentation-probe recall", "seg_probe", seg_recall),
        ("alignment", "Figure 10: vision–language alignment", "alignment", alignment),
    ]


def draw_figures(grouped: dict[str, list[ResultsFile]], figure_dir: Path) -> list[FigureOutcome]:
    """Draw every figure type whose inputs exist; the others come back with a skip reason."""
    outcomes = []
    for name, title, kind, draw in _figure_plan(grouped):
        if not grouped[kind]:
            outcomes.append(FigureOutcome(title, kind, skipped=f"no `{kind}` results files"))
            continue
        try:
            path, caption = draw(figure_dir / f"{name}.png")
        except Skip as reason:
            outcomes.append(FigureOutcome(title, kind, skipped=str(reason)))
            continue
        outcomes.append(FigureOutcome(title, kind, path=path, caption=caption))
    return outcomes


def _md_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def _present(rows: Sequence[dict[str, Any]], keys: Sequence[str]) -> list[str]:
    return [k for k in keys if any(r.get(k) is not None for r in rows)]


def _mean_std(values: Sequence[float], scale: float) -> str:
    values = [v * scale for v in values]
    digits = 2 if scale > 1 else 4
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def _grouped_table(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str], scale: float
) -> str:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(str(row.get(k, "")) for k in keys), []).append(row)
    # Run labels with one value in every row (e.g. the same tower and LLM) go above the table, not in it.
    shared = [
        i
        for i, k in enumerate(keys)
        if k in RUN_LABEL_KEYS
        and k not in ("run", "loss_type")
        and len(groups) > 1
        and len({key[i] for key in groups}) == 1
    ]
    note = "".join(f"{keys[i]}: `{next(iter(groups))[i]}`; " for i in shared).removesuffix("; ")
    body = []
    for key, members in groups.items():
        cells = [cell for i, cell in enumerate(key) if i not in shared] + [str(len(members))]
        for metric in metrics:
            values = [float(r[metric]) for r in members if r.get(metric) is not None]
            cells.append(_mean_std(values, scale) if values else "–")
        body.append(cells)
    headers = [k for i, k in enumerate(keys) if i not in shared]
    table = _md_table([*headers, "n", *metrics], body)
    return f"Every row: {note}.\n\n{table}" if note else table


def kind_table(kind: str, files: Sequence[ResultsFile]) -> str:
    """Markdown table for one results kind (means ± std where rows repeat over seeds)."""
    rows = [row for file in files for row in file.rows]
    if kind == "benchmarks":
        warnings = [w for file in files for w in file.doc.get("warnings", [])]
        suites = {file.doc.get("suite") or "cambrian16" for file in files}
        if len(suites) > 1:
            raise ValueError(f"benchmarks files of different suites {sorted(suites)}: report them apart")
        return markdown_table(rows, warnings, load_registry(suite=suites.pop()))
    labels = _present(rows, RUN_LABEL_KEYS)  # seeds are averaged over, except in Grad-CAM (n = samples)
    per_seed = [k for k in labels if k != "seed"]
    if kind == "linear_probe":
        keys = [*per_seed, "feature_point", *_present(rows, ["pooling", "layer"]), "method"]
        return "Accuracies in %; n = seeds.\n\n" + _grouped_table(rows, keys, ["top1", "top5"], 100.0)
    if kind == "seg_probe":
        keys = [*per_seed, *_present(rows, ["feature_point"])]
        return "Percentages; n = seeds.\n\n" + _grouped_table(
            rows, keys, ["recall", "micro_accuracy", "precision", "f1"], 100.0
        )
    if kind == "alignment":
        keys = [*per_seed, "vision", "language", "metric", "k", *_present(rows, ALIGNMENT_SETTINGS)]
        return "n = seeds.\n\n" + _grouped_table(rows, keys, ["score"], 1.0)
    keys = [*(k for k in labels if k != "loss_type"), *_present(rows, ["step", "loss_type"])]
    return "Mean ± std over samples; n = samples.\n\n" + _grouped_table(
        rows, keys, ["mass_in_box", "entropy"], 1.0
    )


def _shown_path(path: Path, results_dir: Path, out_dir: Path) -> str:
    for root, prefix in ((results_dir, "RESULTS_DIR"), (out_dir, "OUT_DIR")):
        if path.resolve().is_relative_to(root.resolve()):
            return f"{prefix}/{path.resolve().relative_to(root.resolve()).as_posix()}"
    return str(path)


SECTION_TITLES = {
    "benchmarks": "Benchmarks (Cambrian-16)",
    "linear_probe": "Linear probe",
    "seg_probe": "Segmentation probe (ADE20K)",
    "alignment": "Vision–language alignment",
    "gradcam": "Grad-CAM",
}


def render_report(
    grouped: dict[str, list[ResultsFile]],
    outcomes: Sequence[FigureOutcome],
    out_dir: Path,
    results_dir: Path,
    title: str,
    caveat: str | None,
    notes: Sequence[str],
) -> str:
    """The Markdown text of report.md (figure links relative to ``out_dir``)."""
    lines = [f"# {title}", ""]
    if caveat:
        lines += [
            f"> **⚠️ Caveat:** {line}" if i == 0 else f"> {line}" for i, line in enumerate(caveat.splitlines())
        ]
        lines.append("")
    counts = ", ".join(f"{kind}: {len(files)}" for kind, files in grouped.items() if files) or "none"
    lines += [f"Generated from `{results_dir}` (results files by kind: {counts}).", ""]
    measured = claims.evaluate_all(
        {kind: [row for f in files for row in f.rows] for kind, files in grouped.items()}
    )
    if measured:
        lines += ["## Claims of the paper, seed by seed", "", claims.METHOD_NOTE, ""]
        lines += [claims.claims_table(measured), ""]
    for kind in KINDS:
        figures = [o for o in outcomes if o.kind == kind and o.path is not None]
        if not grouped[kind]:
            continue
        world = kind == "benchmarks" and all(f.doc.get("suite") == "world" for f in grouped[kind])
        lines += [
            f"## {'Benchmarks (world suite, Cambrian categories)' if world else SECTION_TITLES[kind]}",
            "",
        ]
        sources = [_shown_path(f.path, results_dir, out_dir) for f in grouped[kind]]
        lines += [f"Sources: {', '.join(f'`{source}`' for source in sources)}", ""]
        seeds = claims.seed_table([r for r in measured if r.measure.kind == kind])
        lines += [seeds, "Every run and setting:", ""] if seeds else []
        lines += [kind_table(kind, grouped[kind]), ""]
        for figure in figures:
            rel = Path(figure.path).resolve().relative_to(Path(out_dir).resolve()).as_posix()
            lines += [f"### {figure.title}", "", f"![{figure.title}]({rel})", "", figure.caption, ""]
    skipped = [o for o in outcomes if o.skipped]
    if skipped:
        lines += ["## Figures skipped for lack of inputs", ""]
        lines += [f"- {o.title}: {o.skipped}" for o in skipped] + [""]
    if notes:
        lines += ["## Files not used", ""] + [f"- {note}" for note in notes] + [""]
    return "\n".join(lines)


def build_report(
    results_dir: Path,
    out_dir: Path,
    caveat: str | None = None,
    title: str = "pivot results",
    lmms_eval_dirs: Sequence[Path] = (),
    labels: Path | None = None,
    registry: Path | None = None,
) -> Path:
    """Draw the figures and write ``out_dir/report.md``; returns the report's path."""
    out_dir = Path(out_dir)
    if Path(results_dir).resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(f"OUT_DIR {out_dir} contains RESULTS_DIR {results_dir}; write the report elsewhere")
    out_dir.mkdir(parents=True, exist_ok=True)
    grouped, notes = collect_results(results_dir, exclude=out_dir)
    if lmms_eval_dirs:
        specs = load_registry(registry)
        paths = write_outputs(aggregate(lmms_eval_dirs, load_labels(labels), specs), out_dir, specs)
        doc = json.loads(paths["json"].read_text(encoding="utf-8"))
        grouped["benchmarks"].append(
            ResultsFile(paths["json"], "benchmarks", rows_with_file_labels(paths["json"], doc), doc)
        )
    outcomes = draw_figures(grouped, out_dir / "figures")
    for outcome in outcomes:
        logger.info("%s: %s", outcome.title, outcome.path or f"skipped ({outcome.skipped})")
    report = out_dir / "report.md"
    text = render_report(grouped, outcomes, out_dir, Path(results_dir), title, caveat, notes)
    report.write_text(text, encoding="utf-8")
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.report", description="Figures and a Markdown report from results JSON files."
    )
    parser.add_argument(
        "results_dir", type=Path, help="directory searched recursively for results JSON (kind/rows)"
    )
    parser.add_argument("out_dir", type=Path, help="where report.md and figures/*.png are written")
    parser.add_argument("--caveat", help="text shown prominently at the top of the report")
    parser.add_argument(
        "--caveat_file", "--caveat-file", type=Path, help="read the caveat text from this file"
    )
    parser.add_argument("--title", default="pivot results", help="report title")
    parser.add_argument(
        "--lmms_eval",
        "--lmms-eval",
        type=Path,
        action="append",
        default=[],
        help="lmms-eval output dir to aggregate (repeatable)",
    )
    parser.add_argument(
        "--labels", type=Path, help="labels file for --lmms_eval runs (see analysis.benchmarks)"
    )
    parser.add_argument("--registry", type=Path, help="benchmark registry override for --lmms_eval runs")
    args = parser.parse_args(argv)
    if args.caveat and args.caveat_file:
        parser.error("give --caveat or --caveat_file, not both")
    caveat = args.caveat_file.read_text(encoding="utf-8").strip() if args.caveat_file else args.caveat
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    report = build_report(
        args.results_dir, args.out_dir, caveat, args.title, args.lmms_eval, args.labels, args.registry
    )
    print(f"wrote {report}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
