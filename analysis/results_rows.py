"""Rows of one results JSON file (docs/CONTRACTS.md §4) with the file-level run labels filled in.

A results file's top-level ``run``, ``loss_type``, ``vision_tower``, ``llm``, ``data_size`` and
``seed`` are defaults for its rows; a row's own value wins. Every reader of results files
(analysis.report, analysis.summary) goes through ``rows_with_file_labels`` so rows from different
files stay distinguishable however the labels were written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from analysis.benchmarks import LABEL_KEYS

RUN_LABEL_KEYS: tuple[str, ...] = ("run", *LABEL_KEYS)


def rows_with_file_labels(path: Path, doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of results document ``doc`` (read from ``path``), each with the file-level labels as defaults."""
    rows = doc.get("rows")
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{path}: kind {doc.get('kind')!r} needs 'rows', a list of objects")
    file_labels = {k: doc[k] for k in RUN_LABEL_KEYS if doc.get(k) is not None}
    return [{**file_labels, **row} for row in rows]
