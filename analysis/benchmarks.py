"""Aggregate lmms-eval results into the Cambrian-16 benchmark table (paper Table 1 and Tables R–T).

Protocol (DESIGN §5 "Benchmarks", Cambrian-1): 16 benchmarks in four categories; every score is mapped
to 0–100 (MME perception, 0–2000, is divided by 20); each category average is the plain mean of its
4 benchmarks and the overall average the plain mean of the 16. A benchmark a run lacks is shown as
missing and left out of the averages with a warning; it is never counted as 0.

Input: one lmms-eval output directory per run, ``<output_path>/<model>/<timestamp>_results.json``
(top-level ``results`` = ``{task: {"metric,filter": value, ...}}``, ``n-samples``, ``config``) and,
when lmms-eval ran with ``--log_samples``, ``<timestamp>_samples_<task>.jsonl`` beside it. The run
label is the directory name unless a labels file renames it. Several results files in one directory
are merged (a task found twice is taken from the newest file, with a warning).

The registry ``BENCHMARKS`` maps display name → lmms-eval task, metric keys, native scale, category.
The metric keys are the ones lmms-eval 0.7 writes in ``results[task]`` (checked against its task
YAMLs, v0.3–v0.7.2); the first key present is used, so other versions' spellings are aliases::

    MME-P               mme                        mme_perception_score,none (≤0.2.4: mme_percetion_score) 0–2000
    MMBench             mmbench_en_dev             gpt_eval_score,none                                     0–100
    SEED-I              seedbench                  seed_image,none                                         0–1
    GQA                 gqa                        exact_match,none                                        0–1
    SQA-I               scienceqa_img              exact_match,none                                        0–1
    MMMU-val            mmmu_val                   mmmu_acc,none                                           0–1
    MathVista-testmini  mathvista_testmini_format  llm_as_judge_eval,none (≤0.3.5: gpt_eval_score)         0–100
    AI2D                ai2d                       exact_match,flexible-extract                            0–1
    ChartQA             chartqa                    relaxed_overall,none                                    0–1
    OCRBench            ocrbench                   ocrbench_accuracy,none                                  0–1
    TextVQA             textvqa_val                exact_match,none                                        0–1
    DocVQA              docvqa_val                 anls,none                                               0–1
    MMVP                mmvp                       mmvp_pair_accuracy,none                                 0–1
    RealWorldQA         realworldqa                exact_match,flexible-extract (0.7.2+: exact_match,none) 0–1
    CV-Bench-2D / -3D   cv_bench                   per-sample log (cv_bench_acc)                           0–1

A run whose results JSON has none of the expected keys for a task it contains gets a
``BenchmarkKeyError`` naming the task, the file and the keys that are there. Another lmms-eval
version's names can be used without code changes through an override file (YAML or JSON), e.g.::

    GQA: {metric_keys: ["exact_match,none"]}
    MathVista-testmini: {task: mathvista_testmini_cot, scale: 100}

Recomputed scores (from the per-sample logs):

- CV-Bench-2D = mean of the ADE20K-source and COCO-source accuracies (Cambrian's definition),
  CV-Bench-3D = Omni3D-source accuracy. lmms-eval's own ``cv_bench_acc`` mixes the sources, so
  without per-sample logs both are missing (with a warning to rerun with ``--log_samples``).
- MMVP = pair accuracy: the fraction of image pairs (questions 2k and 2k+1) with both answers right.
  Recomputed from the log when present, otherwise lmms-eval's ``mmvp_pair_accuracy`` is used.

A sample line's per-sample metric (``cv_bench_acc`` / ``mmvp_pair_accuracy``) is either a dict with
``is_correct`` (lmms-eval 0.6+; it also carries ``source`` and MMVP's 0-based ``index``) or a 0/1
number; ``source`` falls back to ``doc.source`` (older lmms-eval kept ``doc`` in the log) and the
MMVP index to ``doc_id``.

Outputs: ``benchmarks.csv``, ``benchmarks.md`` and ``benchmarks.json`` (CONTRACTS §4, kind
"benchmarks": one row per run with ``run``, its labels, one 0–100 key per benchmark, the category
averages, ``Average`` and ``missing``; ``suite`` names the registry). CLI:
``python -m analysis.benchmarks RUN_DIR... --out_dir DIR [--suite world]``.

``--suite world`` scores the miniature's own suite instead (``WORLD_BENCHMARKS``: held-out questions
about the synthetic world, llava/data/world_bench.py), with the same categories and averages.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from analysis.benchmark_samples import RECOMPUTERS, read_samples

logger = logging.getLogger(__name__)

CATEGORIES: tuple[str, ...] = ("General", "Knowledge", "OCR & Chart", "Vision-centric")
AVERAGE = "Average"
LABEL_KEYS: tuple[str, ...] = ("loss_type", "vision_tower", "llm", "data_size", "seed", "train_seed")
"""Run labels; ``train_seed`` is the Stage-2 training seed where a study repeats training (analysis.claims)."""
SAMPLES_MODES: tuple[str, ...] = ("no", "prefer", "require")
RESULTS_SUFFIX = "_results.json"


class BenchmarkKeyError(KeyError):
    """A results file has a task but none of the metric keys the registry expects for it."""

    def __str__(self) -> str:
        return str(self.args[0])


@dataclass(frozen=True)
class BenchmarkSpec:
    """Where one benchmark's score lives in lmms-eval's output and how to map it to 0–100.

    task: lmms-eval task name (a key of ``results``); metric_keys: accepted ``"metric,filter"`` keys,
    first present wins (the first also names the per-sample field); scale: native maximum (1, 100 or
    2000); category: Cambrian category; samples: use the per-sample log "no" | "prefer" | "require";
    recompute: key of ``RECOMPUTERS`` applied to that log.
    """

    task: str
    metric_keys: tuple[str, ...]
    scale: float
    category: str
    samples: str = "no"
    recompute: str | None = None

    def __post_init__(self) -> None:
        if not self.task:
            raise ValueError("BenchmarkSpec.task must name an lmms-eval task")
        if self.scale not in (1, 100, 2000):
            raise ValueError(f"BenchmarkSpec.scale must be 1, 100 or 2000 (native maximum), got {self.scale}")
        if self.category not in CATEGORIES:
            raise ValueError(f"BenchmarkSpec.category must be one of {CATEGORIES}, got {self.category!r}")
        if self.samples not in SAMPLES_MODES:
            raise ValueError(f"BenchmarkSpec.samples must be one of {SAMPLES_MODES}, got {self.samples!r}")
        if self.samples != "no" and self.recompute not in RECOMPUTERS:
            raise ValueError(f"samples={self.samples!r} needs recompute in {sorted(RECOMPUTERS)}")
        if not self.metric_keys:
            raise ValueError(f"task {self.task!r}: metric_keys must name at least one 'metric,filter' key")
        for key in self.metric_keys:
            if "," not in key:
                raise ValueError(
                    f"metric key {key!r} must look like 'metric,filter' (e.g. 'exact_match,none')"
                )

    @property
    def sample_metric(self) -> str:
        """The per-sample field lmms-eval logs for the (first) metric key, e.g. ``cv_bench_acc``."""
        return self.metric_keys[0].split(",", 1)[0]


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "MME-P": BenchmarkSpec("mme", ("mme_perception_score,none", "mme_percetion_score,none"), 2000, "General"),
    "MMBench": BenchmarkSpec("mmbench_en_dev", ("gpt_eval_score,none",), 100, "General"),
    "SEED-I": BenchmarkSpec("seedbench", ("seed_image,none",), 1, "General"),
    "GQA": BenchmarkSpec("gqa", ("exact_match,none",), 1, "General"),
    "SQA-I": BenchmarkSpec("scienceqa_img", ("exact_match,none",), 1, "Knowledge"),
    "MMMU-val": BenchmarkSpec("mmmu_val", ("mmmu_acc,none",), 1, "Knowledge"),
    "MathVista-testmini": BenchmarkSpec(
        "mathvista_testmini_format", ("llm_as_judge_eval,none", "gpt_eval_score,none"), 100, "Knowledge"
    ),
    "AI2D": BenchmarkSpec("ai2d", ("exact_match,flexible-extract",), 1, "Knowledge"),
    "ChartQA": BenchmarkSpec("chartqa", ("relaxed_overall,none",), 1, "OCR & Chart"),
    "OCRBench": BenchmarkSpec("ocrbench", ("ocrbench_accuracy,none",), 1, "OCR & Chart"),
    "TextVQA": BenchmarkSpec("textvqa_val", ("exact_match,none",), 1, "OCR & Chart"),
    "DocVQA": BenchmarkSpec("docvqa_val", ("anls,none",), 1, "OCR & Chart"),
    "MMVP": BenchmarkSpec("mmvp", ("mmvp_pair_accuracy,none",), 1, "Vision-centric", "prefer", "mmvp_pairs"),
    "RealWorldQA": BenchmarkSpec(
        "realworldqa", ("exact_match,flexible-extract", "exact_match,none"), 1, "Vision-centric"
    ),
    "CV-Bench-2D": BenchmarkSpec(
        "cv_bench", ("cv_bench_acc,none",), 1, "Vision-centric", "require", "cv_bench_2d"
    ),
    "CV-Bench-3D": BenchmarkSpec(
        "cv_bench", ("cv_bench_acc,none",), 1, "Vision-centric", "require", "cv_bench_3d"
    ),
}


WORLD_BENCHMARKS: dict[str, BenchmarkSpec] = {
    f"{question_type.capitalize()} ({'forced choice' if mode == 'choice' else 'greedy'})": BenchmarkSpec(
        f"world_{question_type}_{mode}",
        ("acc,none",) if mode == "choice" else ("exact_match,none",),
        1,
        category,
    )
    for category, question_type in (
        ("General", "colour"),
        ("Knowledge", "position"),
        ("OCR & Chart", "shape"),
        ("Vision-centric", "count"),
    )
    for mode in ("choice", "gen")
}
"""The miniature's world benchmark suite (llava/data/world_bench.py): one question type per category,
each as a forced-choice and a greedy-generation task."""

SUITES: dict[str, dict[str, BenchmarkSpec]] = {"cambrian16": BENCHMARKS, "world": WORLD_BENCHMARKS}


def category_members(registry: dict[str, BenchmarkSpec]) -> dict[str, list[str]]:
    """Benchmark display names per category, in registry order."""
    return {cat: [name for name, spec in registry.items() if spec.category == cat] for cat in CATEGORIES}


def _read_mapping(path: Path) -> Any:
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text) if Path(path).suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path}: cannot parse ({exc})") from exc


def load_registry(
    override: Path | dict[str, Any] | None = None, suite: str = "cambrian16"
) -> dict[str, BenchmarkSpec]:
    """The registry of ``suite`` (``SUITES``), with per-benchmark fields replaced from an override.

    Allowed fields: task, metric_keys (list or one string), scale, samples, recompute. The names
    and their categories are fixed (they define the paper's averages).
    """
    if suite not in SUITES:
        raise ValueError(f"unknown benchmark suite {suite!r}; known: {sorted(SUITES)}")
    registry = dict(SUITES[suite])
    if override is None:
        return registry
    source = str(override) if not isinstance(override, dict) else "override dict"
    data = override if isinstance(override, dict) else _read_mapping(Path(override))
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a mapping of benchmark name -> fields")
    allowed = {f.name for f in fields(BenchmarkSpec)} - {"category"}
    for name, changes in data.items():
        if name not in registry:
            raise ValueError(f"{source}: unknown benchmark {name!r}; known: {list(registry)}")
        if not isinstance(changes, dict) or not set(changes) <= allowed:
            raise ValueError(f"{source}: {name!r} must map to a dict with keys from {sorted(allowed)}")
        changes = dict(changes)
        if isinstance(changes.get("metric_keys"), str):
            changes["metric_keys"] = (changes["metric_keys"],)
        if "metric_keys" in changes:
            changes["metric_keys"] = tuple(changes["metric_keys"])
        try:
            registry[name] = replace(registry[name], **changes)
        except ValueError as exc:
            raise ValueError(f"{source}: {name!r}: {exc}") from exc
    return registry


@dataclass
class LmmsEvalRun:
    """The merged lmms-eval output of one run directory."""

    label: str
    path: Path
    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    result_files: dict[str, Path] = field(default_factory=dict)
    sample_files: dict[str, Path] = field(default_factory=dict)
    n_samples: dict[str, dict[str, Any]] = field(default_factory=dict)
    labels: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


def load_run(path: Path, label: str | None = None, labels: dict[str, Any] | None = None) -> LmmsEvalRun:
    """Read every ``*_results.json`` (and its ``*_samples_<task>.jsonl``) in one run directory."""
    path = Path(path)
    files = sorted(path.glob(f"*{RESULTS_SUFFIX}"))
    if not files:
        raise FileNotFoundError(
            f"{path}: no lmms-eval '*{RESULTS_SUFFIX}' file (is this the <model> subdirectory?)"
        )
    run = LmmsEvalRun(label=label or path.name, path=path, labels=dict(labels or {}))
    for file in files:
        doc = _read_mapping(file)
        if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
            raise ValueError(f"{file}: not an lmms-eval results file (no top-level 'results' object)")
        date_id = file.name[: -len(RESULTS_SUFFIX)]
        for task, metrics in doc["results"].items():
            if not isinstance(metrics, dict):
                raise ValueError(f"{file}: results[{task!r}] must be an object of 'metric,filter' keys")
            if task in run.results:
                run.warnings.append(
                    f"{run.label}: task {task!r} in {run.result_files[task].name} and {file.name}; using the newer"
                )
            run.results[task] = metrics
            run.result_files[task] = file
            run.sample_files.pop(task, None)
            samples = path / f"{date_id}_samples_{task}.jsonl"
            if samples.is_file():
                run.sample_files[task] = samples
            counts = (doc.get("n-samples") or {}).get(task)
            if isinstance(counts, dict):
                run.n_samples[task] = counts
    return run


def discover_runs(paths: Iterable[Path]) -> list[Path]:
    """Run directories: each path itself if it holds results files, else every such directory below it."""
    found: list[Path] = []
    for path in map(Path, paths):
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: not a directory")
        if any(path.glob(f"*{RESULTS_SUFFIX}")):
            found.append(path)
            continue
        below = sorted({file.parent for file in path.rglob(f"*{RESULTS_SUFFIX}")})
        if not below:
            raise FileNotFoundError(f"{path}: no lmms-eval '*{RESULTS_SUFFIX}' file in it or below it")
        found.extend(below)
    return found


@dataclass
class RunScores:
    """One row of the table: 0–100 scores (None = missing), averages and what was left out."""

    run: str
    labels: dict[str, Any]
    scores: dict[str, float | None]
    categories: dict[str, float | None]
    average: float | None
    missing: list[str]
    warnings: list[str]

    def to_row(self) -> dict[str, Any]:
        """The CONTRACTS §4 ``benchmarks`` row."""
        row: dict[str, Any] = {"run": self.run, **self.labels}
        row.update(self.scores)
        row.update(self.categories)
        row[AVERAGE] = self.average
        row["missing"] = list(self.missing)
        return row


def _direct_score(run: LmmsEvalRun, name: str, spec: BenchmarkSpec) -> tuple[float | None, str | None]:
    metrics = run.results[spec.task]
    file = run.result_files[spec.task]
    key = next((k for k in spec.metric_keys if k in metrics), None)
    if key is None:
        available = sorted(k for k in metrics if k != "alias" and "_stderr," not in k)
        raise BenchmarkKeyError(
            f"{name}: task {spec.task!r} in {file} has none of the expected metric keys {list(spec.metric_keys)}; "
            f"available: {available}. Pass a registry override (--registry) naming the right key."
        )
    value = metrics[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None, f"{run.label}: {name} missing: {file.name} has {spec.task}[{key!r}] = {value!r}"
    if not 0 <= value <= spec.scale * (1 + 1e-9):
        raise ValueError(
            f"{file}: {spec.task}[{key!r}] = {value} is outside the registry scale 0–{spec.scale:g} "
            f"for {name}; fix the scale with a registry override"
        )
    return value * 100.0 / spec.scale, None


def _score_benchmark(run: LmmsEvalRun, name: str, spec: BenchmarkSpec) -> tuple[float | None, list[str]]:
    if spec.task not in run.results:
        files = sorted({f.name for f in run.result_files.values()})
        return None, [f"{run.label}: {name} missing: task {spec.task!r} not in {files}"]
    notes = []
    counts = run.n_samples.get(spec.task, {})
    if isinstance(counts.get("effective"), int) and counts.get("effective") != counts.get("original"):
        notes.append(
            f"{run.label}: {name} scored on {counts['effective']} of {counts.get('original')} samples (--limit?)"
        )
    if spec.samples != "no" and spec.task in run.sample_files:
        path = run.sample_files[spec.task]
        value, recompute_notes = RECOMPUTERS[str(spec.recompute)](
            read_samples(path), spec.sample_metric, path
        )
        notes.extend(f"{run.label}: {name}: {note}" for note in recompute_notes)
        if value is None:
            return None, [*notes, f"{run.label}: {name} missing: cannot recompute from {path.name}"]
        if spec.samples == "prefer" and any(k in run.results[spec.task] for k in spec.metric_keys):
            reported, _ = _direct_score(run, name, spec)
            if reported is not None and abs(reported - 100.0 * value) > 0.05:
                notes.append(
                    f"{run.label}: {name} recomputed {100 * value:.2f} differs from lmms-eval's {reported:.2f}; "
                    "using the recomputed score"
                )
        return 100.0 * value, notes
    if spec.samples == "require":
        file = run.result_files[spec.task].name
        return None, [
            *notes,
            f"{run.label}: {name} missing: needs the per-sample log of task {spec.task!r} next to {file} "
            "(rerun lmms-eval with --log_samples)",
        ]
    value, note = _direct_score(run, name, spec)
    return value, [*notes, *([note] if note else [])]


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def score_run(run: LmmsEvalRun, registry: dict[str, BenchmarkSpec] | None = None) -> RunScores:
    """Map every benchmark of one run to 0–100 and average them (missing ones left out, warned)."""
    registry = registry or BENCHMARKS
    warnings = list(run.warnings)
    scores: dict[str, float | None] = {}
    for name, spec in registry.items():
        scores[name], notes = _score_benchmark(run, name, spec)
        warnings.extend(notes)
    missing = [name for name, value in scores.items() if value is None]
    categories = {
        cat: _mean([scores[n] for n in members]) for cat, members in category_members(registry).items()
    }
    if missing:
        warnings.append(
            f"{run.label}: averages exclude {len(missing)} missing benchmark(s) {missing}; "
            f"they are not comparable with full {len(registry)}-benchmark averages"
        )
    for warning in warnings:
        logger.warning(warning)
    return RunScores(
        run=run.label,
        labels=dict(run.labels),
        scores=scores,
        categories=categories,
        average=_mean(list(scores.values())),
        missing=missing,
        warnings=warnings,
    )


def table_columns(registry: dict[str, BenchmarkSpec] | None = None) -> list[str]:
    """Score columns in table order: Average, the four categories, then the 16 grouped by category."""
    members = category_members(registry or BENCHMARKS)
    return [AVERAGE, *CATEGORIES, *(name for cat in CATEGORIES for name in members[cat])]


def _label_columns(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [key for key in LABEL_KEYS if any(row.get(key) is not None for row in rows)]


def _partial_columns(row: dict[str, Any], registry: dict[str, BenchmarkSpec]) -> set[str]:
    missing = set(row.get("missing") or ())
    partial = {cat for cat, names in category_members(registry).items() if missing & set(names)}
    return partial | ({AVERAGE} if missing else set())


def markdown_table(
    rows: Sequence[dict[str, Any]],
    warnings: Sequence[str] = (),
    registry: dict[str, BenchmarkSpec] | None = None,
) -> str:
    """Markdown table of ``benchmarks`` rows: missing as "–", averages over fewer benchmarks marked *."""
    registry = registry or BENCHMARKS
    labels = _label_columns(rows)
    columns = table_columns(registry)
    lines = [
        "| " + " | ".join(["Run", *labels, *columns]) + " |",
        "|" + "---|" * (1 + len(labels)) + "---:|" * len(columns),
    ]
    any_partial = False
    for row in rows:
        partial = _partial_columns(row, registry)
        any_partial |= bool(partial)
        cells = [str(row["run"]), *(str(row.get(k, "")) if row.get(k) is not None else "" for k in labels)]
        for column in columns:
            value = row.get(column)
            cells.append("–" if value is None else f"{value:.1f}" + ("*" if column in partial else ""))
        lines.append("| " + " | ".join(cells) + " |")
    notes = [
        "",
        "All scores on 0–100"
        + ("; MME-P is the perception score divided by 20" if "MME-P" in registry else "")
        + f". Averages are plain means (each category over its benchmarks, Average over all {len(registry)})."
        " – = missing.",
    ]
    if any_partial:
        notes.append(
            "\\* average over the available benchmarks only (missing ones are excluded, not counted as 0)."
        )
    if warnings:
        notes += ["", "**Warnings**", "", *(f"- {w}" for w in warnings)]
    return "\n".join(lines + notes) + "\n"


def write_outputs(
    results: Sequence[RunScores], out_dir: Path, registry: dict[str, BenchmarkSpec] | None = None
) -> dict[str, Path]:
    """Write benchmarks.csv, benchmarks.md and benchmarks.json (kind "benchmarks") into ``out_dir``."""
    registry = registry or BENCHMARKS
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = [result.to_row() for result in results]
    warnings = [w for result in results for w in result.warnings]
    labels = _label_columns(rows)
    columns = table_columns(registry)
    paths = {name: out_dir / f"benchmarks.{name}" for name in ("csv", "md", "json")}
    with paths["csv"].open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", *labels, *columns, "missing"])
        for row in rows:
            values = ["" if row.get(c) is None else round(row[c], 4) for c in columns]
            label_values = ["" if row.get(k) is None else row[k] for k in labels]
            writer.writerow([row["run"], *label_values, *values, ";".join(row["missing"])])
    paths["md"].write_text(markdown_table(rows, warnings, registry), encoding="utf-8")
    doc = {
        "kind": "benchmarks",
        "suite": next((name for name, specs in SUITES.items() if set(specs) == set(registry)), None),
        "rows": rows,
        "categories": category_members(registry),
        "registry": {
            name: {"task": s.task, "metric_keys": list(s.metric_keys), "scale": s.scale, "samples": s.samples}
            for name, s in registry.items()
        },
        "warnings": warnings,
    }
    paths["json"].write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
    return paths


def load_labels(path: Path | None) -> dict[str, dict[str, Any]]:
    """A labels file: ``{run dir name or path: {run?: new label, loss_type?, vision_tower?, ...}}``."""
    if path is None:
        return {}
    data = _read_mapping(Path(path))
    if not isinstance(data, dict) or not all(isinstance(v, dict) for v in data.values()):
        raise ValueError(f"{path}: expected a mapping of run directory -> {{label: value}}")
    return {str(key): value for key, value in data.items()}


def aggregate(
    paths: Iterable[Path],
    labels: dict[str, dict[str, Any]] | None = None,
    registry: dict[str, BenchmarkSpec] | None = None,
) -> list[RunScores]:
    """Discover the run directories under ``paths`` and score each (the plain-function API)."""
    labels = dict(labels or {})
    runs = discover_runs(paths)
    used: set[str] = set()
    results = []
    for run_dir in runs:
        key = next((k for k in (str(run_dir), run_dir.name) if k in labels), None)
        extra = dict(labels[key]) if key else {}
        if key:
            used.add(key)
        label = extra.pop("run", None)
        results.append(score_run(load_run(run_dir, label=label, labels=extra), registry or BENCHMARKS))
    unused = sorted(set(labels) - used)
    if unused:
        raise ValueError(f"labels given for unknown run(s) {unused}; runs found: {[str(r) for r in runs]}")
    # A run label may repeat when another label tells the rows apart (e.g. the same run at two train_seeds).
    names = [(r.run, json.dumps(r.labels, sort_keys=True, default=str)) for r in results]
    duplicates = sorted({n for n, labels in names if names.count((n, labels)) > 1})
    if duplicates:
        raise ValueError(f"run labels {duplicates} are not unique; rename them in a labels file")
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.benchmarks",
        description="Aggregate lmms-eval results into the Cambrian-16 table (CSV, Markdown, results JSON).",
    )
    parser.add_argument(
        "paths",
        nargs="+",
        type=Path,
        help="run directories holding *_results.json, or folders searched below",
    )
    parser.add_argument(
        "--out_dir", "--out-dir", type=Path, required=True, help="where benchmarks.{csv,md,json} are written"
    )
    parser.add_argument(
        "--labels",
        type=Path,
        help="YAML/JSON {run dir name or path: {run: label, loss_type, vision_tower, llm, data_size, seed}}",
    )
    parser.add_argument(
        "--registry", type=Path, help="YAML/JSON override of task names, metric keys or scales per benchmark"
    )
    parser.add_argument(
        "--suite",
        choices=sorted(SUITES),
        default="cambrian16",
        help="benchmark suite: cambrian16 (the paper's) or world (the miniature's, llava/data/world_bench.py)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    registry = load_registry(args.registry, args.suite)
    results = aggregate(args.paths, load_labels(args.labels), registry)
    paths = write_outputs(results, args.out_dir, registry)
    print(paths["md"].read_text(encoding="utf-8"))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
