"""Data tables as record sources: `datasets` directories, parquet files or globs, and hub ids (issue 17).

Besides .json/.jsonl files, a `--data_path` (or a YAML mixture's `json_path`) may name:

- a directory written by `datasets`' `save_to_disk` (a `Dataset`, or a `DatasetDict` whose `train` split,
  or the split named after a colon, is read: `path/to/dir:validation`);
- a `.parquet` file or a glob of them (`data/*.parquet`);
- a hub dataset id with an optional config and split, `org/name:CONFIG[:SPLIT]` (split `train` by
  default), e.g. `lmms-lab/LLaVA-OneVision-Data:CLEVR-Math(MathV360K)`, read with
  `datasets.load_dataset(org/name, CONFIG, split=SPLIT)`; a local directory laid out like a hub dataset
  repo (data files, a README with `configs`) is read the same way.

Columns follow the LLaVA layout (`id`, `image`, `conversations`) or the DPO layout (`id`, `image`,
`prompt`, `chosen`, `rejected`, `meta`?) or the GRPO prompt layout (`id`, `image`, `prompt`, `answer`,
`answer_format`?, `box`?, `meta`?); other columns are ignored. `image` may be a `datasets.Image`
feature (or a list of them), encoded bytes, or file paths (then resolved against `--image_folder` like
a JSON record's). Embedded images stay in the table (memory-mapped; never copied): a record's images are
labelled `"<source>[<row>]"` in messages and read back from the table row when the item is loaded.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from llava.data.errors import DataFileError

GLOB_CHARS = "*?["
RECORD_FILE_SUFFIXES = (".json", ".jsonl")
DPO_COLUMNS = ("prompt", "chosen", "rejected")
PROMPT_COLUMNS = ("prompt", "answer")  # GRPO; answer_format, box and meta optional
KIND_COLUMNS = {
    "conversation": ("id", "image", "conversations"),
    "preference": ("id", "image", *DPO_COLUMNS, "meta"),
    "prompt": ("id", "image", *PROMPT_COLUMNS, "answer_format", "box", "meta"),
}
DEFAULT_SPLIT = "train"


def split_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`path_or_id[:config[:split]]` → (path_or_id, config, split); colons before the last '/' are kept."""
    head, slash, tail = spec.rpartition("/")
    name, *rest = tail.split(":")
    if len(rest) > 2:
        raise DataFileError(spec, "expected 'path_or_hub_id[:CONFIG[:SPLIT]]'")
    config = rest[0] or None if rest else None
    split = rest[1] or None if len(rest) > 1 else None
    return head + slash + name, config, split


def is_record_file(spec: str) -> bool:
    return os.path.splitext(spec)[1].lower() in RECORD_FILE_SUFFIXES


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, name)) for name in ("state.json", "dataset_dict.json"))


def source_exists(spec: str) -> bool:
    """Whether a (possibly relative) spec names something on disk: a file, a directory or a glob's files."""
    path = split_spec(spec)[0]
    if any(char in path for char in GLOB_CHARS):
        return bool(glob.glob(path))
    return os.path.exists(path)


def looks_like_hub_id(spec: str) -> bool:
    path = split_spec(spec)[0]
    parts = path.split("/")
    local = is_record_file(path) or path.endswith(".parquet") or any(c in path for c in GLOB_CHARS)
    return len(parts) == 2 and all(parts) and not os.path.isabs(path) and not local


def is_table_spec(spec: str) -> bool:
    """A saved dataset or dataset-repo directory, parquet file(s) or glob, or a hub id (not a local file)."""
    path = split_spec(spec)[0]
    if os.path.isdir(path) or path.endswith(".parquet") or any(char in path for char in GLOB_CHARS):
        return True
    return not os.path.exists(path) and looks_like_hub_id(spec)


def source_files(spec: str) -> list[str]:
    """The local files behind a table spec (for the store fingerprint); [] for a hub id."""
    path = split_spec(spec)[0]
    if any(char in path for char in GLOB_CHARS):
        return sorted(glob.glob(path))
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        return sorted(str(p) for p in Path(path).rglob("*") if p.is_file() and ".cache" not in p.parts)
    return []


def _local_cache(spec: str) -> str:
    """A `datasets` cache directory of its own for a local dataset-repo directory: `datasets` names the
    cache of such a directory by its base name and config only, so two directories (or one whose files
    changed) would share a stale cache; this one is keyed by every file's path, size and mtime."""
    from datasets import config

    stats = [[os.path.abspath(f), os.path.getsize(f), os.stat(f).st_mtime_ns] for f in source_files(spec)]
    key = hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:20]
    return os.path.join(config.HF_DATASETS_CACHE, "pivot_local_repos", key)


def _as_undecoded(dataset):
    """The table with its image column(s) read as {"bytes", "path"} dicts instead of decoded PIL images."""
    from datasets import Image, List, Sequence

    feature = dataset.features.get("image")
    if isinstance(feature, Image):
        return dataset.cast_column("image", Image(decode=False))
    if isinstance(feature, (List, Sequence)) and isinstance(feature.feature, Image):
        return dataset.cast_column("image", List(Image(decode=False)))
    return dataset


def open_table(spec: str):
    """The `datasets.Dataset` a table spec names (see the module docstring), images undecoded."""
    from datasets import DatasetDict, load_dataset, load_from_disk

    path, config, split = split_spec(spec)
    try:
        if os.path.isdir(path) and _is_saved_dataset(path):
            if config is not None and split is None:  # a saved DatasetDict takes `dir:split`
                config, split = None, config
            dataset = load_from_disk(path)
            if isinstance(dataset, DatasetDict):
                dataset = dataset[split or DEFAULT_SPLIT]
        elif path.endswith(".parquet") or any(char in path for char in GLOB_CHARS):
            files = sorted(glob.glob(path))
            if not files:
                raise DataFileError(spec, "no parquet files match")
            dataset = load_dataset("parquet", data_files=files, split=split or DEFAULT_SPLIT)
        elif os.path.isdir(path):  # a local directory laid out like a hub dataset repo
            dataset = load_dataset(
                os.path.abspath(path), config, split=split or DEFAULT_SPLIT, cache_dir=_local_cache(spec)
            )
        else:
            dataset = load_dataset(path, config, split=split or DEFAULT_SPLIT)
    except DataFileError:
        raise
    except (FileNotFoundError, ValueError, KeyError, OSError) as error:
        raise DataFileError(spec, f"cannot open as a datasets table: {error}") from error
    return _as_undecoded(dataset)


def table_kind(dataset, spec: str) -> str:
    """'preference' for the DPO layout, 'prompt' for the GRPO layout, 'conversation' for the LLaVA layout;
    else a DataFileError."""
    columns = set(dataset.column_names)
    if set(DPO_COLUMNS) <= columns:
        return "preference"
    if set(PROMPT_COLUMNS) <= columns:
        return "prompt"
    if "conversations" in columns:
        return "conversation"
    raise DataFileError(
        spec,
        f"columns {sorted(columns)} fit neither the LLaVA layout (id, image, conversations), the DPO "
        "layout (id, image, prompt, chosen, rejected) nor the GRPO layout (id, image, prompt, answer)",
    )


def image_bytes(value: Any) -> list[bytes] | None:
    """The encoded images of a row's `image` value when they are embedded; None when they are paths."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    embedded = [
        v if isinstance(v, bytes) else v.get("bytes") if isinstance(v, dict) else None for v in values
    ]
    if not values or all(data is None for data in embedded):
        return None
    if any(data is None for data in embedded):
        raise ValueError("a row mixes embedded images and image paths")
    return embedded


def _image_paths(value: Any) -> Any:
    """A row's `image` value as the path(s) a JSON record would hold (for images that are not embedded)."""
    if isinstance(value, dict):
        return value.get("path")
    if isinstance(value, list):
        return [_image_paths(v) for v in value]
    return value


def raw_rows(dataset, spec: str, indices: list[int], kind: str) -> Iterator[tuple[int, dict, bool]]:
    """(row, raw record dict as in a JSON file, whether its images are embedded) for the given rows.

    Embedded images become labels `"<spec>[<row>]"` (one per image, numbered when several) so the
    record rules (placeholders, counts) apply unchanged; their bytes stay in the table.
    """
    columns = [key for key in KIND_COLUMNS[kind] if key in dataset.column_names]
    batch_size = 1000
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        rows = dataset.select(chunk).select_columns(columns).to_list()
        for row_index, row in zip(chunk, rows):
            raw = {key: value for key, value in row.items() if value is not None or key == "image"}
            try:
                embedded = image_bytes(row.get("image"))
            except ValueError as error:
                raise DataFileError(spec, f"row {row_index}: {error}") from error
            if embedded is not None:
                label = f"{spec}[{row_index}]"
                raw["image"] = (
                    [label] if len(embedded) == 1 else [f"{label}#{i}" for i in range(len(embedded))]
                )
            else:
                raw["image"] = _image_paths(row.get("image"))
            if raw.get("image") is None:
                raw.pop("image", None)
            if isinstance(raw.get("meta"), str):
                raw.pop("meta")  # a JSON-encoded meta column is not a mapping; meta is informational only
            yield row_index, raw, embedded is not None
