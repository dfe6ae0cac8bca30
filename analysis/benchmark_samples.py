"""Per-sample lmms-eval logs (``*_samples_<task>.jsonl``) and the scores recomputed from them.

Part of the Cambrian-16 aggregation (analysis/benchmarks.py, which documents the protocol):
CV-Bench-2D = mean of the ADE20K- and COCO-source accuracies, CV-Bench-3D = Omni3D-source accuracy
(Cambrian's definitions), MMVP = pair accuracy over questions 2k, 2k+1. A sample line's metric is a
dict with ``is_correct`` (lmms-eval 0.6+, also carrying ``source`` and MMVP's 0-based ``index``) or a
0/1 number; ``source`` falls back to ``doc.source`` and the MMVP index to ``doc_id``. Bad lines raise
naming file and line.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

MMVP_PAIRS = 150


def read_samples(path: Path) -> list[dict[str, Any]]:
    """Read an lmms-eval ``*_samples_<task>.jsonl`` file; a bad line raises naming file and line."""
    samples = []
    with Path(path).open(encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from exc
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line")
            record["_line"] = lineno
            samples.append(record)
    if not samples:
        raise ValueError(f"{path}: per-sample log is empty")
    return samples


def _sample_correct(sample: dict[str, Any], metric: str, path: Path) -> bool:
    where = f"{path}:{sample['_line']}"
    if metric not in sample:
        keys = sorted(k for k in sample if not k.startswith("_"))
        raise ValueError(f"{where}: no per-sample metric {metric!r}; keys: {keys}")
    value = sample[metric]
    if isinstance(value, dict):
        if "is_correct" not in value:
            raise ValueError(f"{where}: {metric!r} has no 'is_correct'; keys: {sorted(value)}")
        value = value["is_correct"]
    if isinstance(value, bool) or (isinstance(value, (int, float)) and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{where}: {metric!r} correctness must be true/false or 0/1, got {value!r}")


def _sample_source(sample: dict[str, Any], metric: str, path: Path) -> str:
    value = sample.get(metric)
    if isinstance(value, dict) and "source" in value:
        return str(value["source"])
    doc = sample.get("doc")
    if isinstance(doc, dict) and "source" in doc:
        return str(doc["source"])
    raise ValueError(f"{path}:{sample['_line']}: no 'source' in {metric!r} or in 'doc'")


def source_accuracies(samples: Sequence[dict[str, Any]], metric: str, path: Path) -> dict[str, float]:
    """Accuracy per CV-Bench ``source`` (ADE20K, COCO, Omni3D) as fractions."""
    correct: dict[str, list[bool]] = {}
    for sample in samples:
        source = _sample_source(sample, metric, path)
        correct.setdefault(source, []).append(_sample_correct(sample, metric, path))
    return {source: sum(flags) / len(flags) for source, flags in correct.items()}


def _mean_of_sources(sources: tuple[str, ...]) -> Callable[..., tuple[float | None, list[str]]]:
    def recompute(
        samples: Sequence[dict[str, Any]], metric: str, path: Path
    ) -> tuple[float | None, list[str]]:
        accuracies = source_accuracies(samples, metric, path)
        absent = [source for source in sources if source not in accuracies]
        if absent:
            return None, [f"{path}: no samples from source(s) {absent} (found {sorted(accuracies)})"]
        return sum(accuracies[source] for source in sources) / len(sources), []

    return recompute


def mmvp_pair_accuracy(
    samples: Sequence[dict[str, Any]], metric: str, path: Path
) -> tuple[float | None, list[str]]:
    """Fraction of MMVP pairs (0-based question indices 2k, 2k+1) with both questions correct."""
    by_index: dict[int, bool] = {}
    for sample in samples:
        value = sample.get(metric)
        index = value.get("index") if isinstance(value, dict) else None
        if index is None:
            index = sample.get("doc_id")
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"{path}:{sample['_line']}: no usable question index ('index' or 'doc_id')")
        if index in by_index:
            raise ValueError(f"{path}:{sample['_line']}: MMVP question index {index} appears twice")
        by_index[index] = _sample_correct(sample, metric, path)
    pairs: dict[int, list[bool]] = {}
    for index, flag in by_index.items():
        pairs.setdefault(index // 2, []).append(flag)
    complete = [flags for flags in pairs.values() if len(flags) == 2]
    notes = []
    incomplete = sorted(pair for pair, flags in pairs.items() if len(flags) != 2)
    if incomplete:
        notes.append(f"{path}: {len(incomplete)} MMVP pair(s) with one question only, excluded: {incomplete}")
    if len(complete) != MMVP_PAIRS:
        notes.append(f"{path}: {len(complete)} complete MMVP pairs, the benchmark has {MMVP_PAIRS}")
    if not complete:
        return None, notes
    return sum(all(flags) for flags in complete) / len(complete), notes


RECOMPUTERS: dict[str, Callable[..., tuple[float | None, list[str]]]] = {
    "cv_bench_2d": _mean_of_sources(("ADE20K", "COCO")),
    "cv_bench_3d": _mean_of_sources(("Omni3D",)),
    "mmvp_pairs": mmvp_pair_accuracy,
}
