"""Shared helpers for the data-layer tests: one tiny tokenizer per process, small files on disk."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from PIL import Image

IGNORE = -100


@functools.lru_cache(maxsize=1)
def tiny_tokenizer():
    """The offline tiny tokenizer, built once per test process (training takes well under a second)."""
    from llava.model.tiny_tokenizer import build_tiny_tokenizer

    return build_tiny_tokenizer()


def write_image(
    path: Path, size: tuple[int, int] = (40, 24), colour: tuple[int, int, int] = (200, 30, 30)
) -> Path:
    """Write an RGB PNG of PIL size (width, height) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_json(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def write_jsonl(path: Path, records: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    return path


def supervised_spans(input_ids: list[int], labels: list[int]) -> list[list[int]]:
    """Maximal runs of supervised positions, as lists of token ids (labels checked equal to inputs)."""
    spans: list[list[int]] = []
    previous = False
    for token, label in zip(input_ids, labels):
        supervised = label != IGNORE
        if supervised:
            assert label == token, "a supervised label must equal its input id"
            if not previous:
                spans.append([])
            spans[-1].append(token)
        previous = supervised
    return spans
