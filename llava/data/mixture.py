"""Loading records from a data file or a LLaVA-NeXT YAML mixture (DESIGN §3, `--data_path`).

`data_path` is one of:

- a `.json` file holding a list of records, or a `.jsonl` file with one record per line (blank lines
  are allowed and ignored);
- a `.yaml`/`.yml` mixture, LLaVA-NeXT style::

      datasets:
        - json_path: llava/instruct.json
          sampling_strategy: random:10%     # all | first:N | end:N | random:N, N a count or a percentage

  A relative `json_path` is looked up first in the YAML file's directory (so a mixture file works from
  anywhere), then in the current working directory (LLaVA-NeXT's and PIVOT's convention, e.g. PIVOT's
  `single_image.yaml`); if neither exists the error names both paths tried. A percentage keeps `ceil(p * len / 100)` records (as upstream).
  `random:N` draws N distinct records with `random.Random(f"{seed}:{position}")` (position = index of the
  entry in the mixture) and keeps them in file order; `first`/`end` take the first/last N.

Records are parsed after sampling, with their index in the original file, so default ids
(`"<file stem>:<index>"`) do not depend on the sampling. Image paths are resolved against `image_folder`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import yaml

from llava.data.errors import DataFileError, RecordError
from llava.data.records import RECORD_PARSERS, Record, parse_record
from llava.data.sources import (
    is_record_file,
    is_table_spec,
    looks_like_hub_id,
    open_table,
    raw_rows,
    source_exists,
    source_files,
    table_kind,
)

logger = logging.getLogger(__name__)

SAMPLING_STRATEGIES = ("all", "first", "end", "random")
RECORD_FILE_SUFFIXES = (".json", ".jsonl")  # besides data tables (llava.data.sources)
MIXTURE_FILE_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class SamplingStrategy:
    """`all`, or `first`/`end`/`random` with an amount: a count (`"100"`) or a percentage (`"10%"`)."""

    name: str
    amount: str | None = None

    @classmethod
    def parse(cls, text: str, path: str) -> SamplingStrategy:
        """Parse `"all"` or `"<name>:<N>"`; errors name the mixture file `path`."""
        name, _, amount = str(text).strip().partition(":")
        if name not in SAMPLING_STRATEGIES:
            raise DataFileError(path, f"unknown sampling_strategy {text!r}; use one of {SAMPLING_STRATEGIES}")
        if name == "all":
            if amount:
                raise DataFileError(path, f"sampling_strategy 'all' takes no amount, got {text!r}")
            return cls(name)
        amount = amount.strip()
        number = amount[:-1] if amount.endswith("%") else amount
        try:
            value = float(number) if amount.endswith("%") else int(number)
        except ValueError as error:
            raise DataFileError(
                path, f"sampling_strategy {text!r} needs an amount like '{name}:100' or '{name}:10%'"
            ) from error
        if amount.endswith("%") and not 0 < value <= 100:
            raise DataFileError(path, f"sampling_strategy {text!r}: percentage must be in (0, 100]")
        if value < 1 and not amount.endswith("%"):
            raise DataFileError(path, f"sampling_strategy {text!r}: count must be >= 1")
        return cls(name, amount)

    def count(self, n_records: int, path: str) -> int:
        """How many of `n_records` records this strategy keeps; errors name the data file `path`."""
        if self.amount is None:
            return n_records
        if self.amount.endswith("%"):
            return math.ceil(float(self.amount[:-1]) * n_records / 100)
        count = int(self.amount)
        if count > n_records:
            raise DataFileError(
                path, f"{self.name}:{count} asks for more records than the file holds ({n_records})"
            )
        return count

    def select(self, n_records: int, rng: random.Random, path: str) -> list[int]:
        """Indices (in file order) of the records kept from a file of `n_records` records."""
        count = self.count(n_records, path)
        if self.name == "first":
            return list(range(count))
        if self.name == "end":
            return list(range(n_records - count, n_records))
        if self.name == "random":
            return sorted(rng.sample(range(n_records), count))
        return list(range(n_records))


@dataclass(frozen=True)
class MixtureEntry:
    """One dataset of a mixture: a record file and how to sample it."""

    json_path: str
    strategy: SamplingStrategy


def read_raw_records(path: str) -> list[Any]:
    """Read the raw records of a `.json` (list) or `.jsonl` file."""
    if not os.path.isfile(path):
        raise DataFileError(path, "data file not found")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in RECORD_FILE_SUFFIXES:
        raise DataFileError(
            path, f"unsupported record file type {suffix!r}; use .json, .jsonl or a .yaml mixture"
        )
    with open(path, encoding="utf-8") as handle:
        if suffix == ".json":
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise DataFileError(path, f"invalid JSON: {error}") from error
            if not isinstance(records, list):
                raise DataFileError(
                    path, f"a .json data file must hold a list of records, got {type(records).__name__}"
                )
            return records
        records = []
        for line_number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise DataFileError(path, f"line {line_number}: invalid JSON: {error}") from error
        return records


def resolve_json_path(json_path: str, mixture_path: str, position: int) -> str:
    """`json_path` of entry `position` of `mixture_path`: absolute as given, else relative to the mixture's
    directory if that exists, else relative to the working directory if that exists; a data table
    (llava.data.sources: saved dataset dir, parquet file or glob, hub id) the same way, a hub id as given."""
    if os.path.isabs(json_path):
        return json_path
    beside_mixture = os.path.join(os.path.dirname(os.path.abspath(mixture_path)), json_path)
    from_cwd = os.path.abspath(json_path)
    for candidate in (beside_mixture, from_cwd):
        if os.path.isfile(candidate) or (not is_record_file(candidate) and source_exists(candidate)):
            return candidate
    if looks_like_hub_id(json_path):
        return json_path
    raise DataFileError(
        mixture_path,
        f"datasets[{position}].json_path {json_path!r} not found: tried {beside_mixture} (relative to the "
        f"mixture file) and {from_cwd} (relative to the working directory {os.getcwd()})",
    )


def read_mixture(path: str) -> list[MixtureEntry]:
    """Parse a YAML mixture file into its entries (json paths resolved by `resolve_json_path`)."""
    if not os.path.isfile(path):
        raise DataFileError(path, "mixture file not found")
    with open(path, encoding="utf-8") as handle:
        try:
            spec = yaml.safe_load(handle)
        except yaml.YAMLError as error:
            raise DataFileError(path, f"invalid YAML: {error}") from error
    if not isinstance(spec, dict) or not isinstance(spec.get("datasets"), list) or not spec["datasets"]:
        raise DataFileError(path, "a mixture must be a mapping with a non-empty list 'datasets'")
    entries = []
    for position, item in enumerate(spec["datasets"]):
        if not isinstance(item, dict) or not isinstance(item.get("json_path"), str):
            raise DataFileError(path, f"datasets[{position}] must be a mapping with a string 'json_path'")
        unknown = set(item) - {"json_path", "sampling_strategy"}
        if unknown:
            raise DataFileError(path, f"datasets[{position}] has unknown keys {sorted(unknown)}")
        json_path = resolve_json_path(item["json_path"], path, position)
        strategy = SamplingStrategy.parse(item.get("sampling_strategy", "all"), path)
        entries.append(MixtureEntry(json_path=json_path, strategy=strategy))
    return entries


def raw_record_kind(record: Any) -> str:
    """ "preference" with `chosen`, "prompt" (GRPO) with `prompt` or `answer` and no `chosen`, else
    "conversation"."""
    if not isinstance(record, dict):
        return "conversation"
    if "chosen" in record:
        return "preference"
    return "prompt" if "prompt" in record or "answer" in record else "conversation"


def file_record_kind(raw: list[Any], path: str) -> str:
    """The kind most of a file's raw records have (`raw_record_kind`).

    Decided over every record, so one bad record is reported as what it lacks instead of turning the
    file into another kind; a tie for the most refuses, naming the counts.
    """
    counts = Counter(raw_record_kind(record) for record in raw)
    ranked = counts.most_common()
    if len(ranked) > 1 and ranked[0][1] == ranked[1][1]:
        listed = ", ".join(f"{n} {kind}" for kind, n in ranked)
        raise DataFileError(
            path,
            f"records of several kinds in equal numbers ({listed}; preference records have 'chosen', "
            "GRPO prompt records 'prompt' and 'answer'); a file holds one kind",
        )
    return ranked[0][0]


def load_records(
    data_path: str,
    image_folder: str | None,
    kind: str,
    seed: int = 0,
    errors: list[RecordError] | None = None,
) -> list[Record]:
    """Load and validate records from a .json/.jsonl file or a YAML mixture (see module docstring).

    `kind` is "conversation", "preference" or "prompt"; `seed` drives `random:N` sampling. An invalid record
    raises its `RecordError`, unless an `errors` list is given: then every invalid record's error is
    appended to it and the valid records are returned (the caller decides what to do with them).
    """
    if kind not in RECORD_PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; choose one of {sorted(RECORD_PARSERS)}")
    return load_records_of_their_kind(data_path, image_folder, seed, errors, kind)[1]


def load_records_of_their_kind(
    data_path: str,
    image_folder: str | None,
    seed: int = 0,
    errors: list[RecordError] | None = None,
    kind: str | None = None,
) -> tuple[str, list[Record]]:
    """`load_records` that, without a `kind`, takes it from the data: each file's majority kind
    (`file_record_kind`, decided while the file is read, so nothing is read twice); the files of a
    mixture must agree. Returns (kind, records). Tables with embedded images need the record store
    (llava.data.store), which reads their images back from the table."""
    records: list[Record] = []
    stream = RecordStream(data_path, image_folder, seed, errors, kind)
    for record, table, _ in stream:
        if table is not None and record.images and table.embedded:
            raise DataFileError(
                table.spec, "has embedded images: open it with llava.data.store.open_record_store"
            )
        records.append(record)
    return stream.kind, records  # repeated ids are refused on the records a run trains on


def refuse_duplicate_ids(records: Sequence[Record], data_path: str) -> None:
    """Sample ids of the records a run trains on must be unique (checked after invalid records are removed):
    sample_order.jsonl, the matched sampler and the reference cache identify samples by id. The error names
    each repeated id (up to 5) and the files it occurs in. A record store's ids and sources are compared as
    Arrow columns (`RecordStore.arrow_column`), without a Python object per record."""
    if hasattr(records, "arrow_column"):
        ids, sources = records.arrow_column("id"), records.arrow_column("source")
    else:
        ids = pa.array([record.id for record in records], pa.string())
        sources = pa.array([record.source for record in records], pa.string())
    counts = pc.value_counts(ids)
    repeated = counts.filter(pc.greater(counts.field("counts"), 1))
    if not len(repeated):
        return
    shown_ids = repeated.field("values")[:5]
    where = pc.is_in(ids, value_set=shown_ids)
    files: dict[str, set[str]] = {}
    for record_id, source in zip(ids.filter(where).to_pylist(), sources.filter(where).to_pylist()):
        files.setdefault(record_id, set()).add(source)
    shown = "; ".join(
        f"{record_id!r} x{n} in {', '.join(sorted(files[record_id]))}"
        for record_id, n in zip(shown_ids.to_pylist(), repeated.field("counts")[:5].to_pylist())
    )
    raise DataFileError(
        data_path,
        f"{len(repeated)} sample id(s) occur more than once ({shown}{'; ...' if len(repeated) > 5 else ''}); "
        "sample_order.jsonl and the reference cache identify samples by id: give each record its own id.",
    )


@dataclass
class TableSource:
    """A data table a mixture entry read (llava.data.sources); `embedded`: some row held image bytes."""

    spec: str
    dataset: Any
    embedded: bool = False


def mixture_entries(data_path: str) -> list[MixtureEntry]:
    """The entries of `data_path`: a YAML mixture's, or the one file/table taken whole."""
    data_path = str(data_path)
    if os.path.splitext(data_path)[1].lower() in MIXTURE_FILE_SUFFIXES:
        return read_mixture(data_path)
    return [MixtureEntry(json_path=data_path, strategy=SamplingStrategy("all"))]


def entry_files(spec: str) -> list[str]:
    """The local files an entry reads: the .json/.jsonl file, or every file of a data table (saved dataset
    directory, parquet file or glob, local dataset-repo directory); [] for a hub id. A spec naming nothing
    on disk that cannot be a hub id (a record file, a parquet file or glob, an absolute path) is refused,
    naming it."""
    if not is_table_spec(spec):
        if not os.path.isfile(spec):
            raise DataFileError(spec, "no such file")
        return [spec]
    files = source_files(spec)
    if files or (looks_like_hub_id(spec) and not source_exists(spec)):
        return files
    raise DataFileError(spec, "no such file, directory or parquet files")


def data_inputs(data_path: str) -> list[tuple[MixtureEntry, list[str]]]:
    """Every entry of `data_path` (`mixture_entries`) with the local files it reads (`entry_files`): what
    the record store's fingerprint (llava.data.store) and the run identity (llava.train.preflight) cover."""
    return [(entry, entry_files(entry.json_path)) for entry in mixture_entries(data_path)]


def _open_entry(path: str) -> tuple[list[Any] | None, TableSource | None, int]:
    """(raw records, None, n) for a .json/.jsonl file; (None, table, n) for a data table."""
    if not is_table_spec(path):
        raw = read_raw_records(path)
        return raw, None, len(raw)
    table = TableSource(path, open_table(path))
    return None, table, len(table.dataset)


class RecordStream:
    """Every record of a file, table or mixture after sampling, parsed, as (record, table, row): `table`
    is the `TableSource` it came from (None for a .json/.jsonl file), `row` its index there. Invalid
    records raise, or go to `errors` when given (see `load_records`). `kind` is the given kind, or the
    one the data decided (`file_record_kind`) once iterated."""

    def __init__(
        self,
        data_path: str,
        image_folder: str | None,
        seed: int = 0,
        errors: list[RecordError] | None = None,
        kind: str | None = None,
    ) -> None:
        if kind is not None and kind not in RECORD_PARSERS:
            raise ValueError(f"unknown record kind {kind!r}; choose one of {sorted(RECORD_PARSERS)}")
        self.data_path, self.image_folder, self.seed = str(data_path), image_folder, seed
        self.errors, self.kind = errors, kind

    def _decide_kind(self, raw: list[Any] | None, table: TableSource | None, path: str, decided_by):
        file_kind = file_record_kind(raw, path) if table is None else table_kind(table.dataset, path)
        if self.kind is None:
            self.kind = file_kind
            return path
        if file_kind != self.kind:
            raise DataFileError(
                path,
                f"holds {file_kind} records, but {decided_by} holds {self.kind} records; a mixture holds one kind",
            )
        return decided_by

    def __iter__(self) -> Iterator[tuple[Record, TableSource | None, int]]:
        decided_by = None  # without a given kind: the file whose records decided it
        for position, entry in enumerate(mixture_entries(self.data_path)):
            raw, table, n_records = _open_entry(entry.json_path)
            if n_records and (self.kind is None or decided_by is not None):
                decided_by = self._decide_kind(raw, table, entry.json_path, decided_by)
            if self.kind is None:
                continue  # an empty file before any record: nothing to parse
            rng = random.Random(f"{self.seed}:{position}")
            indices = entry.strategy.select(n_records, rng, entry.json_path)
            if table is None:
                rows = ((index, raw[index], False) for index in indices)
            else:
                table_kind(table.dataset, entry.json_path)  # refuses a table of neither layout
                rows = raw_rows(table.dataset, entry.json_path, indices, self.kind)
            for index, item, embedded in rows:
                folder = None if embedded else self.image_folder
                try:
                    record = parse_record(item, entry.json_path, index, self.kind, folder)
                except RecordError as error:
                    if self.errors is None:
                        raise
                    self.errors.append(error)
                    continue
                if embedded:
                    table.embedded = True
                yield record, table, index
            logger.info(
                "%s: kept %d of %d records (%s)", entry.json_path, len(indices), n_records, entry.strategy
            )
        if self.kind is None:
            raise DataFileError(self.data_path, "no records")
