"""The record store: records parsed once into a memory-mapped Arrow table shared by every rank (issue 17).

`open_record_store(data_path, image_folder, seed, kind, cache_dir)` reads a .json/.jsonl file, a data
table (llava.data.sources) or a YAML mixture of them exactly as `llava.data.mixture.load_records` does
(same sampling, ids, `--image_folder` rules and record rules), writes the parsed records with `datasets`'
`ArrowWriter` to `<cache_dir>/records-<fingerprint>/records.arrow`, and memory-maps it with
`datasets.Dataset.from_file`. Nothing per record lives in Python objects: a `RecordStore` is the mapped
table plus, once records were dropped, one int64 array of the rows kept. Items are read back as the same
`ConversationRecord` / `PreferenceRecord` / `PromptRecord` (GRPO) the list path gives.

The fingerprint covers every input the records depend on: the data path, the mixture file's text and each
entry's sampling strategy, every input file's path, size and mtime (all files of a saved dataset or a
parquet glob; a hub id by its name, config and split), `--image_folder`, the record kind asked for and,
when an entry samples `random:N`, the seed. The store does not depend on the tokenizer or the template
(they only enter the validation, llava.data.validation, whose own fingerprint holds them), so an SFT and a
DPO run, or runs with different tokenizers, share one store per data set. Image files are not
fingerprinted (stat-ing millions of files would cost what the store saves): change an image and keep its
name, and delete the cache directory. The store is written to a temporary directory and renamed, so a
reader never sees half a store. Records that fail parsing are kept as (error class, file, id, reason) in
`meta.json`, for `--skip_invalid` and its report.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llava.data import errors as error_classes
from llava.data.errors import DataFileError, RecordError
from llava.data.mixture import MIXTURE_FILE_SUFFIXES, RecordStream, data_inputs
from llava.data.records import ConversationRecord, PreferenceRecord, PromptRecord, Record
from llava.data.sources import image_bytes, open_table

logger = logging.getLogger(__name__)

STORE_VERSION = 2  # 2: GRPO prompt records (answer, answer_format, box)
RECORDS_FILE = "records.arrow"
META_FILE = "meta.json"
WRITE_BATCH = 10_000


def _features():
    from datasets import Features, List, Value

    text = Value("string")  # null where the record's kind has no such field
    return Features(
        {
            "id": text,
            "source": text,
            "images": List(text),
            "embedded": Value("bool"),
            "table": Value("int32"),
            "row": Value("int64"),
            "humans": List(text),
            "replies": List(text),
            "prompt": text,
            "chosen": text,
            "rejected": text,
            "answer": text,
            "answer_format": text,
            "box": List(Value("float64")),
            "meta": text,
        }
    )


def _file_stat(path: str) -> list:
    stat = os.stat(path)
    return [os.path.abspath(path), stat.st_size, stat.st_mtime_ns]


def data_fingerprint(data_path: str, image_folder: str | None, seed: int, kind: str | None) -> str:
    """The hex digest naming the store of these inputs (see the module docstring)."""
    data_path = str(data_path)
    inputs_of = data_inputs(data_path)
    mixture = None
    if os.path.splitext(data_path)[1].lower() in MIXTURE_FILE_SUFFIXES:
        mixture = Path(data_path).read_text(encoding="utf-8")
    sources = [
        {"spec": entry.json_path, "strategy": str(entry.strategy), "files": [_file_stat(f) for f in files]}
        for entry, files in inputs_of
    ]
    entries = [entry for entry, _ in inputs_of]
    inputs = {
        "version": STORE_VERSION,
        "data_path": os.path.abspath(data_path) if os.path.exists(data_path) else data_path,
        "mixture": mixture,
        "sources": sources,
        "image_folder": os.path.abspath(image_folder) if image_folder else None,
        "kind": kind,
        "seed": seed if any(e.strategy.name == "random" for e in entries) else None,
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:20]


def _row(record: Record, table: int, row: int, embedded: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": record.id,
        "source": record.source,
        "images": record.images,
        "embedded": embedded,
        "table": table,
        "row": row,
        "humans": [],
        "replies": [],
        "prompt": None,
        "chosen": None,
        "rejected": None,
        "answer": None,
        "answer_format": None,
        "box": None,
        "meta": None,
    }
    if isinstance(record, PreferenceRecord):
        out.update(prompt=record.prompt, chosen=record.chosen, rejected=record.rejected)
        out["meta"] = json.dumps(record.meta) if record.meta else None
    elif isinstance(record, PromptRecord):
        out.update(
            prompt=record.prompt, answer=record.answer, answer_format=record.answer_format, box=record.box
        )
        out["meta"] = json.dumps(record.meta) if record.meta else None
    else:
        out["humans"] = [human for human, _ in record.turns]
        out["replies"] = [reply for _, reply in record.turns]
    return out


def build_record_store(
    data_path: str, image_folder: str | None, seed: int, kind: str | None, directory: Path
) -> None:
    """Parse every record into `directory` (written under a temporary name, then renamed)."""
    from datasets.arrow_writer import ArrowWriter

    tmp = directory.with_name(f"{directory.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    parse_errors: list[RecordError] = []
    stream = RecordStream(data_path, image_folder, seed, parse_errors, kind)
    tables: list[str] = []
    batch: dict[str, list] = {name: [] for name in _features()}
    with ArrowWriter(features=_features(), path=str(tmp / RECORDS_FILE)) as writer:
        for record, table, row in stream:
            if table is not None and table.spec not in tables:
                tables.append(table.spec)
            position = -1 if table is None else tables.index(table.spec)
            embedded = table is not None and bool(record.images) and table.embedded
            for name, value in _row(record, position, row, embedded).items():
                batch[name].append(value)
            if len(batch["id"]) >= WRITE_BATCH:
                writer.write_batch(batch)
                batch = {name: [] for name in batch}
        if batch["id"]:
            writer.write_batch(batch)
        writer.finalize()
    meta = {
        "kind": stream.kind,
        "tables": tables,
        "parse_errors": [[type(e).__name__, e.path, e.record_id, e.reason] for e in parse_errors],
    }
    (tmp / META_FILE).write_text(json.dumps(meta))
    try:
        os.replace(tmp, directory)
    except OSError:  # another process renamed an identical store first
        shutil.rmtree(tmp, ignore_errors=True)


def error_from(name: str, path: str, record_id: str, reason: str) -> RecordError:
    """The `RecordError` subclass `name` (llava.data.errors), rebuilt from its saved parts."""
    cls = getattr(error_classes, name, RecordError)
    if not (isinstance(cls, type) and issubclass(cls, RecordError)):
        cls = RecordError
    return cls(path, record_id, reason)


class RecordStore(Sequence[Record]):
    """The memory-mapped records of one store directory, optionally restricted to some rows."""

    def __init__(self, directory: str | Path, rows: np.ndarray | None = None, built: bool = False) -> None:
        from datasets import Dataset

        self.directory = Path(directory)
        meta = json.loads((self.directory / META_FILE).read_text())
        self.kind: str = meta["kind"]
        self.table_specs: list[str] = meta["tables"]
        self._parse_errors: list[list[str]] = meta["parse_errors"]
        self.data = Dataset.from_file(str(self.directory / RECORDS_FILE))
        self.rows = rows
        self.built = built
        self._tables: dict[int, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_tables"] = {}  # reopened lazily in each DataLoader worker
        return state

    def __len__(self) -> int:
        return len(self.data) if self.rows is None else len(self.rows)

    def row_of(self, index: int) -> int:
        """The row of the stored table behind item `index`."""
        if not -len(self) <= index < len(self):
            raise IndexError(index)
        return int(index % len(self) if self.rows is None else self.rows[index])

    def raw(self, index: int) -> dict[str, Any]:
        return self.data[self.row_of(index)]

    def __getitem__(self, index: int) -> Record:  # type: ignore[override]
        return to_record(self.raw(index))

    def column(self, name: str) -> list:
        """One column, for the rows in use, as a list (transient; e.g. the ids for the sampler)."""
        column = self.data.data.column(name)
        if self.rows is not None:
            column = column.take(self.rows)
        return column.to_pylist()

    def arrow_column(self, name: str):
        """One column, for the rows in use, as a pyarrow array (no Python object per record)."""
        column = self.data.data.column(name).combine_chunks()
        return column if self.rows is None else column.take(self.rows)

    @property
    def ids(self) -> list[str]:
        return self.column("id")

    def select(self, indices: Sequence[int]) -> RecordStore:
        """A view of the items at `indices` (positions in this store), sharing the mapped table."""
        view = RecordStore.__new__(RecordStore)
        view.__dict__.update(self.__dict__)
        rows = np.arange(len(self.data)) if self.rows is None else self.rows
        view.rows = rows[np.asarray(indices, dtype=np.int64)]
        view._tables = {}
        return view

    def image_data(self, index: int) -> list[bytes] | None:
        """The encoded images of item `index` when they are embedded in a data table, else None."""
        raw = self.raw(index)
        if not raw["embedded"]:
            return None
        table = raw["table"]
        if table not in self._tables:
            self._tables[table] = open_table(self.table_specs[table])
        return image_bytes(self._tables[table][raw["row"]]["image"])

    def parse_errors(self) -> list[RecordError]:
        """The records that failed parsing while the store was built (they are not in it)."""
        return [error_from(*parts) for parts in self._parse_errors]


def to_record(raw: dict[str, Any]) -> Record:
    """The record of a stored row."""
    if raw["answer"] is not None:
        return PromptRecord(
            id=raw["id"],
            images=raw["images"],
            prompt=raw["prompt"],
            answer=raw["answer"],
            answer_format=raw["answer_format"],
            box=raw["box"],
            meta=json.loads(raw["meta"]) if raw["meta"] else {},
            source=raw["source"],
        )
    if raw["chosen"] is not None:
        return PreferenceRecord(
            id=raw["id"],
            images=raw["images"],
            prompt=raw["prompt"],
            chosen=raw["chosen"],
            rejected=raw["rejected"],
            meta=json.loads(raw["meta"]) if raw["meta"] else {},
            source=raw["source"],
        )
    return ConversationRecord(
        id=raw["id"],
        images=raw["images"],
        turns=list(zip(raw["humans"], raw["replies"])),
        source=raw["source"],
    )


def open_record_store(
    data_path: str,
    image_folder: str | None,
    cache_dir: str | Path,
    seed: int = 0,
    kind: str | None = None,
    build: bool = True,
) -> RecordStore:
    """The store of these inputs under `cache_dir`, built first if absent (only when `build`; a process
    that must not build, e.g. a non-main rank after the main one built, gets an error instead)."""
    directory = Path(cache_dir) / f"records-{data_fingerprint(data_path, image_folder, seed, kind)}"
    built = False
    if not (directory / META_FILE).is_file():
        if not build:
            raise DataFileError(
                str(data_path),
                f"record store {directory} not found; the main process builds it. Is the data cache dir "
                "on a filesystem every node shares?",
            )
        logger.info("building the record store of %s in %s", data_path, directory)
        build_record_store(str(data_path), image_folder, seed, kind, directory)
        built = True
    store = RecordStore(directory, built=built)
    if kind is not None and store.kind != kind:
        raise DataFileError(str(data_path), f"holds {store.kind} records, not {kind} records")
    logger.info("record store %s: %d records (%s)", directory, len(store), "built" if built else "reused")
    return store
