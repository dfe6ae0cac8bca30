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
from dataclasses import dataclass
from typing import Any

import yaml

from llava.data.errors import DataFileError, RecordError
from llava.data.records import RECORD_PARSERS, Record, parse_record

logger = logging.getLogger(__name__)

SAMPLING_STRATEGIES = ("all", "first", "end", "random")
RECORD_FILE_SUFFIXES = (".json", ".jsonl")
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
    directory if that file exists, else relative to the working directory if that exists."""
    if os.path.isabs(json_path):
        return json_path
    beside_mixture = os.path.join(os.path.dirname(os.path.abspath(mixture_path)), json_path)
    if os.path.isfile(beside_mixture):
        return beside_mixture
    from_cwd = os.path.abspath(json_path)
    if os.path.isfile(from_cwd):
        return from_cwd
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


def _parse_indices(
    raw: list[Any],
    indices: list[int],
    source: str,
    kind: str,
    image_folder: str | None,
    errors: list[RecordError] | None,
) -> list[Record]:
    records = []
    for index in indices:
        try:
            records.append(parse_record(raw[index], source, index, kind, image_folder))
        except RecordError as error:
            if errors is None:
                raise
            errors.append(error)
    return records


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
    mixture must agree. Returns (kind, records)."""
    data_path = str(data_path)
    if os.path.splitext(data_path)[1].lower() in MIXTURE_FILE_SUFFIXES:
        entries = read_mixture(data_path)
    else:
        entries = [MixtureEntry(json_path=data_path, strategy=SamplingStrategy("all"))]
    records: list[Record] = []
    decided_by = None  # without a given kind: the file whose records decided it
    for position, entry in enumerate(entries):
        raw = read_raw_records(entry.json_path)
        if raw and (kind is None or decided_by is not None):
            file_kind = file_record_kind(raw, entry.json_path)
            if kind is None:
                kind, decided_by = file_kind, entry.json_path
            elif file_kind != kind:
                raise DataFileError(
                    entry.json_path,
                    f"holds {file_kind} records, but {decided_by} holds {kind} records; a mixture holds one kind",
                )
        if kind is None:
            continue  # an empty file before any record: nothing to parse
        indices = entry.strategy.select(len(raw), random.Random(f"{seed}:{position}"), entry.json_path)
        records += _parse_indices(raw, indices, entry.json_path, kind, image_folder, errors)
        logger.info("%s: kept %d of %d records (%s)", entry.json_path, len(indices), len(raw), entry.strategy)
    if kind is None:
        raise DataFileError(data_path, "no records")
    return kind, records  # repeated ids are refused on the records a run trains on (refuse_duplicate_ids)


def refuse_duplicate_ids(records: list[Record], data_path: str) -> None:
    """Sample ids of the records a run trains on must be unique (checked after invalid records are removed):
    sample_order.jsonl, the matched sampler and the reference cache identify samples by id. The error names
    each repeated id (up to 5) and the files it occurs in."""
    files: dict[str, list[str]] = {}
    for record in records:
        files.setdefault(record.id, []).append(record.source)
    repeated = {record_id: sources for record_id, sources in files.items() if len(sources) > 1}
    if repeated:
        shown = "; ".join(
            f"{record_id!r} x{len(sources)} in {', '.join(sorted(set(sources)))}"
            for record_id, sources in list(repeated.items())[:5]
        )
        raise DataFileError(
            data_path,
            f"{len(repeated)} sample id(s) occur more than once ({shown}{'; ...' if len(repeated) > 5 else ''}); "
            "sample_order.jsonl and the reference cache identify samples by id: give each record its own id.",
        )
