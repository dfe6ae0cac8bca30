"""The training data of a run: record store, cached validation and the shared lengths (issue 17).

`prepare_dataset` opens (or, on the main process, builds) the record store of `--data_path`
(llava.data.store) and its validation (llava.data.validation), and returns a `MultimodalDataset` over the
memory-mapped store with what the entry point needs to stop on, or skip, invalid records. Called on
every process inside `main_process_first(local=False)`: the main process of the main node builds both
caches with `num_proc` workers while every other process waits; the others then only read them
(`build=False`: a missing cache is an error, e.g. a cache directory not shared between nodes).

`--group_by_length` orders samples by a length both runs of a comparison share (llava.train.sampling
`grouped_order`): the DPO record's prompt + longer reply. A preference run reads it from its own
validation; an SFT (or GRPO) run reads it from `--length_data_path` (the DPO data of the comparison, validated with
the same tokenizer, template and limits, cached like any store), matched by id. Without
`--length_data_path` an SFT run groups by its own conversation lengths and is warned that its order then
differs from the DPO run's.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from llava.data.dataset import ImageProcessor, MultimodalDataset
from llava.data.errors import DataFileError, RecordError
from llava.data.store import open_record_store
from llava.data.validation import Validation, validate_store

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataSettings:
    """The data options of a run (llava.train.args DataArguments plus the seed and the cache directory)."""

    data_path: str
    image_folder: str | None
    conv_template: str
    model_max_length: int
    cache_dir: str
    seed: int = 0
    num_proc: int = 1
    skip_invalid: bool = False
    skip_log: str | None = None
    group_by_length: bool = False
    length_data_path: str | None = None

    def __post_init__(self) -> None:
        if self.num_proc < 1:
            raise ValueError(f"--data_num_proc must be >= 1, got {self.num_proc}")
        if self.length_data_path and not self.group_by_length:
            raise ValueError(
                "--length_data_path orders samples only with --group_by_length; add it or drop it."
            )


@dataclass
class PreparedData:
    dataset: MultimodalDataset
    parse_errors: list[RecordError]
    validation: Validation


def _open(
    data_path: str,
    settings: DataSettings,
    tokenizer,
    image_processor: ImageProcessor | None,
    image_token_count: Callable[[int, int], int],
    build: bool,
) -> PreparedData:
    store = open_record_store(
        data_path, settings.image_folder, settings.cache_dir, seed=settings.seed, build=build
    )
    dataset = MultimodalDataset(
        store,
        tokenizer,
        image_processor,
        settings.conv_template,
        image_token_count,
        settings.model_max_length,
        skip_invalid=settings.skip_invalid,
        skip_log=settings.skip_log,
    )
    validation = validate_store(dataset, settings.num_proc, build=build)
    return PreparedData(dataset, store.parse_errors(), validation)


def prepare_dataset(
    settings: DataSettings,
    tokenizer,
    image_processor: ImageProcessor,
    image_token_count: Callable[[int, int], int],
    build: bool = True,
) -> PreparedData:
    """The run's dataset over the record store, its parse errors and validation (see the module docstring).
    With `group_by_length`, `dataset.group_lengths` holds the shared length of every record."""
    prepared = _open(settings.data_path, settings, tokenizer, image_processor, image_token_count, build)
    if settings.group_by_length:
        lengths = prepared.validation.shared_lengths()
        if settings.length_data_path:
            source = _open(settings.length_data_path, settings, tokenizer, None, image_token_count, build)
            lengths = lengths_by_id(prepared.dataset.ids, source, settings.length_data_path)
        elif prepared.dataset.records.kind != "preference":
            logger.warning(
                "--group_by_length on %s records without --length_data_path: samples are grouped "
                "by their own lengths, so a DPO run on the paired data sees another order. Pass the DPO data "
                "as --length_data_path to both runs for a matched comparison.",
                prepared.dataset.records.kind,
            )
        prepared.dataset.group_lengths = lengths
    return prepared


def lengths_by_id(ids: list[str], source: PreparedData, path: str) -> np.ndarray:
    """The shared lengths of `source`'s records for `ids` (matched by id; the first occurrence wins)."""
    positions = pc.index_in(pa.array(ids, pa.string()), value_set=pa.array(source.dataset.ids, pa.string()))
    missing = np.flatnonzero(positions.is_null().to_numpy(zero_copy_only=False))
    if len(missing):
        raise DataFileError(
            path,
            f"has no record for {len(missing)} sample id(s) of this run, e.g. {[ids[i] for i in missing[:5]]}; "
            "--length_data_path must hold every id (the DPO data paired with this SFT data)",
        )
    lengths = source.validation.shared_lengths()[positions.to_numpy()]
    if (lengths < 0).any():
        bad = [ids[i] for i in np.flatnonzero(lengths < 0)[:5]]
        raise DataFileError(path, f"records {bad} are invalid there, so they have no length to order by")
    return lengths


def default_cache_dir() -> str:
    """`<datasets cache>/pivot_records` (HF_DATASETS_CACHE, ~/.cache/huggingface/datasets by default): one
    store per data set for every run on the machine, SFT and DPO alike. Multi-node runs need a directory
    every node sees (--data_cache_dir)."""
    from datasets import config

    return str(Path(config.HF_DATASETS_CACHE) / "pivot_records")
