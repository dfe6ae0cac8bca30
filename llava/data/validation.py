"""The pre-training check of a record store, run once, in parallel, and cached next to the store (issue 17).

`validate_store(dataset, num_proc)` runs `MultimodalDataset.check` (image headers, tokenisation with the
image-token counts of the header sizes, the `model_max_length` limit; the rules of `invalid_records`)
over every stored record with `datasets.Dataset.map(num_proc=...)`, and saves, per stored row: the
error class and reason (null when valid), the token lengths (`length`: the conversation or prompt+chosen;
`rejected_length`: prompt+rejected, -1 for conversations) and the image sizes (`heights`, `widths`), to
`<store>/validation-<fingerprint>/` (written under a temporary name, then renamed).

The fingerprint covers the store (itself keyed by the data, llava.data.store), the tokenizer (datasets'
`Hasher` over the tokenizer object: vocabulary, merges, special tokens), the template, `model_max_length`
and the image-token rule (`Hasher` over the counting function and the values it closes over, e.g. the
model's `image_seq_length` or its anyres grid). Any change gives a new fingerprint and a new validation;
a resume or another rank with the same inputs reads the saved one. Results are per stored row, so a
dataset restricted with `keep` reads its rows' results.

In a multi-process run, `prepare_dataset` (llava.data.prepared) lets the main process of the main node
build the store and the validation while every other process waits, then reads both.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llava.data.dataset import HeaderCache, MultimodalDataset
from llava.data.errors import RecordError
from llava.data.store import RecordStore, error_from

logger = logging.getLogger(__name__)

VALIDATION_VERSION = 1
VALIDATION_FILE = "validation.arrow"


def validation_fingerprint(dataset: MultimodalDataset) -> str:
    """What the check of `dataset`'s store depends on, as a hex digest (see the module docstring)."""
    from datasets.fingerprint import Hasher

    store = dataset.records
    parts = [
        str(VALIDATION_VERSION),
        store.directory.name,
        Hasher.hash(dataset.tokenizer),
        dataset.template.name,
        str(dataset.model_max_length),
        Hasher.hash(dataset.image_token_count),
    ]
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:20]


_HEADERS = HeaderCache()  # per validating process: each image path is probed once


def _check_rows(batch: dict, dataset: MultimodalDataset) -> dict:
    out: dict[str, list] = {
        k: [] for k in ("error", "reason", "length", "rejected_length", "heights", "widths")
    }
    for row in batch["row"]:
        error, lengths, sizes = dataset.check(row, _HEADERS)
        out["error"].append(None if error is None else type(error).__name__)
        out["reason"].append(None if error is None else error.reason)
        out["length"].append(lengths[0] if lengths else -1)
        out["rejected_length"].append(lengths[1] if len(lengths) > 1 else -1)
        out["heights"].append([h for h, _ in sizes])
        out["widths"].append([w for _, w in sizes])
    return out


def _build(dataset: MultimodalDataset, directory: Path, num_proc: int) -> None:
    from datasets import Dataset

    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _HEADERS.headers.clear()  # headers are read afresh by every validation
    full = MultimodalDataset(
        dataset.records.select(np.arange(len(dataset.records.data))),
        dataset.tokenizer,
        None,  # the check decodes no pixels
        dataset.template.name,
        dataset.image_token_count,
        dataset.model_max_length,
    )
    rows = Dataset.from_dict({"row": np.arange(len(full), dtype=np.int64)})
    result = rows.map(
        _check_rows,
        batched=True,
        batch_size=1000,
        num_proc=max(1, min(num_proc, len(full))) if len(full) else None,
        fn_kwargs={"dataset": full},
        remove_columns=["row"],
        cache_file_name=str(tmp / "shards" / VALIDATION_FILE),
        new_fingerprint=directory.name,
        desc="validating records",
    )
    result.save_to_disk(str(tmp / "saved"))
    shutil.rmtree(tmp / "shards", ignore_errors=True)
    try:
        os.replace(tmp, directory)
    except OSError:  # another process renamed an identical validation first
        shutil.rmtree(tmp, ignore_errors=True)


@dataclass
class Validation:
    """Per item of the dataset: errors of the invalid ones (by position), token lengths, whether built here."""

    invalid: list[tuple[int, RecordError]]
    lengths: np.ndarray
    rejected_lengths: np.ndarray
    built: bool

    def shared_lengths(self) -> np.ndarray:
        """The length both runs of a comparison share: prompt + the longer reply for preference records,
        the conversation's length otherwise."""
        return np.maximum(self.lengths, self.rejected_lengths)


def validate_store(dataset: MultimodalDataset, num_proc: int = 1, build: bool = True) -> Validation:
    """The cached check of a store-backed dataset (built first if absent and `build`)."""
    from datasets import load_from_disk

    store = dataset.records
    if not isinstance(store, RecordStore):
        raise TypeError("validate_store needs a dataset over a llava.data.store.RecordStore")
    directory = store.directory / f"validation-{validation_fingerprint(dataset)}"
    built = False
    if not directory.is_dir():
        if not build:
            raise FileNotFoundError(f"validation {directory} not found; the main process builds it")
        logger.info("validating %d records with %d process(es) into %s", len(store.data), num_proc, directory)
        _build(dataset, directory, num_proc)
        built = True
    table = load_from_disk(str(directory / "saved")).data
    rows = np.arange(len(store.data)) if store.rows is None else store.rows
    errors = table.column("error").take(rows)
    bad = np.flatnonzero(errors.is_valid().to_numpy(zero_copy_only=False))
    names = errors.take(bad).to_pylist()
    reasons = table.column("reason").take(rows.take(bad)).to_pylist()
    invalid = []
    for position, name, reason in zip(bad.tolist(), names, reasons):
        record = store[position]
        invalid.append((position, error_from(name, record.source, record.id, reason)))
    lengths = table.column("length").take(rows).to_numpy()
    rejected = table.column("rejected_length").take(rows).to_numpy()
    logger.info(
        "validation %s (%s): %d records, %d with errors",
        directory.name,
        "built" if built else "reused",
        len(rows),
        len(invalid),
    )
    return Validation(invalid, lengths, rejected, built)
