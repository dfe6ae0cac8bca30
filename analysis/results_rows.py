"""Rows of one results JSON file (docs/CONTRACTS.md §4) with the file-level run labels filled in.

A results file's top-level ``run``, ``loss_type``, ``vision_tower``, ``llm``, ``data_size``, ``seed``
and ``train_seed`` are defaults for its rows; a row's own value wins. Every reader of results files
(analysis.report, analysis.summary) goes through ``rows_with_file_labels`` so rows from different
files stay distinguishable however the labels were written.

``python -m analysis.results_rows FILE... --set train_seed=0`` writes file-level labels into results
files after the fact (e.g. the Stage-2 training seed of the checkpoints a probe ran on, which the
probe itself does not know); a value that parses as JSON (``0``, ``null``) is stored as such.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
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


def set_file_labels(path: Path, labels: dict[str, Any]) -> None:
    """Write ``labels`` (keys of ``RUN_LABEL_KEYS``) as file-level labels of the results file ``path``."""
    unknown = sorted(set(labels) - set(RUN_LABEL_KEYS))
    if unknown:
        raise ValueError(f"{path}: unknown run label(s) {unknown}; known: {list(RUN_LABEL_KEYS)}")
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(doc, dict) or "kind" not in doc:
        raise ValueError(f"{path}: not a results file (no top-level 'kind')")
    doc.update(labels)
    Path(path).write_text(json.dumps(doc, indent=1) + "\n", encoding="utf-8")


def _parse_label(text: str) -> tuple[str, Any]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m analysis.results_rows", description=__doc__.splitlines()[0]
    )
    parser.add_argument("files", nargs="+", type=Path, help="results JSON files (with a top-level kind)")
    parser.add_argument(
        "--set", dest="labels", type=_parse_label, action="append", required=True, help="KEY=VALUE"
    )
    args = parser.parse_args(argv)
    for path in args.files:
        set_file_labels(path, dict(args.labels))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
