"""A torch Dataset over parsed records: images loaded and processed, text tokenised with label masks.

Items follow docs/CONTRACTS.md §3: `id`, `input_ids`/`labels` (1-D long tensors; the conversation, or
prompt+chosen for preference records), `rejected_input_ids`/`rejected_labels` (preference records only),
GRPO prompt records give `input_ids` (the prompt up to the assistant header, nothing supervised) and
`reward_record` (the ground truth, `PromptRecord.reward_fields`); and for records with images `pixel_values` (whatever the image processor returns for the record's
images, `[n_images, 3, H, W]` for square models) and `image_sizes` (`[n_images, 2]`, original h, w).
Both sides of a preference pair share one `pixel_values`, so images are encoded once per pair.

The number of visual tokens each `<image>` expands to is `image_token_count(h, w)` of the image's
original size (constant for `square` models, size-dependent for anyres).

`validate()` / `invalid_records()` check every record before training without decoding any pixels:
each image file is opened once per unique path for its header (existence, a format PIL recognises,
the size), and the text is tokenised with the image-token counts of those sizes. A file whose header
is fine but whose pixel data is corrupt passes this check and raises `UnreadableImageError`, naming
the image, the data file and the record, when the item is loaded during training; with `skip_invalid`
the item is replaced instead (`replacement`: the next record in a fixed order of the ids' hashes, so
every run over the same ids, SFT and DPO alike, puts the same record in its place) and the skip is
appended to `skip_log` (one line per process that met it: id, file, reason, replaced_by).

`records` is a list of records or a memory-mapped `llava.data.store.RecordStore` (whose images may be
embedded in a data table); `keep(positions)` restricts either to some records. Validation over a store
runs in parallel and is cached by llava.data.validation, built on `check`.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llava.data.errors import RecordError, UnreadableImageError
from llava.data.images import load_image, probe_image
from llava.data.records import ConversationRecord, PreferenceRecord, PromptRecord, Record
from llava.data.store import RecordStore
from llava.data.templates import get_template
from llava.data.tokenization import tokenize_conversation, tokenize_preference, tokenize_prompt_within

logger = logging.getLogger(__name__)

ImageProcessor = Callable[..., Mapping[str, Any]]


class HeaderCache:
    """`probe_image` once per image path (its error too, re-raised naming each record that uses it);
    embedded images are probed every time. Holds at most `limit` paths (then starts afresh)."""

    def __init__(self, limit: int = 1_000_000) -> None:
        self.headers: dict[str, tuple[int, int] | RecordError] = {}
        self.limit = limit

    def __call__(self, path: str, record: Record, data: bytes | None) -> tuple[int, int]:
        if data is not None:
            return probe_image(path, record.id, record.source, data)
        if path not in self.headers:
            if len(self.headers) >= self.limit:
                self.headers.clear()
            try:
                self.headers[path] = probe_image(path, record.id, record.source)
            except RecordError as error:
                self.headers[path] = error
        found = self.headers[path]
        if isinstance(found, RecordError):
            raise type(found)(record.source, record.id, found.reason)
        return found


class MultimodalDataset(Dataset):
    """Conversation and/or preference records → model-ready items (see module docstring)."""

    def __init__(
        self,
        records: Sequence[Record],
        tokenizer: PreTrainedTokenizerBase,
        image_processor: ImageProcessor,
        template: str,
        image_token_count: Callable[[int, int], int],
        model_max_length: int,
        skip_invalid: bool = False,
        skip_log: str | Path | None = None,
    ) -> None:
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
        self.records: Sequence[Record] = records if isinstance(records, RecordStore) else list(records)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = get_template(template)
        self.image_token_count = image_token_count
        self.model_max_length = model_max_length
        self.skip_invalid = skip_invalid
        self.skip_log = Path(skip_log) if skip_log else None
        self._replacement_order: np.ndarray | None = None
        self._skipped: set[int] = set()
        self.group_lengths: np.ndarray | None = (
            None  # per record, for --group_by_length (llava.data.prepared)
        )

    @property
    def ids(self) -> list[str]:
        """Record ids in dataset order."""
        if isinstance(self.records, RecordStore):
            return self.records.ids
        return [record.id for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def keep(self, positions: Sequence[int]) -> None:
        """Restrict the dataset to the records at `positions` (in this order)."""
        if isinstance(self.records, RecordStore):
            self.records = self.records.select(positions)
        else:
            self.records = [self.records[p] for p in positions]
        if self.group_lengths is not None:
            self.group_lengths = self.group_lengths[np.asarray(positions, dtype=np.int64)]
        self._replacement_order = None

    def image_data(self, index: int) -> list[bytes | None]:
        """Per image of record `index`: its encoded bytes when embedded in a data table, else None."""
        embedded = self.records.image_data(index) if isinstance(self.records, RecordStore) else None
        return embedded or [None] * len(self.records[index].images)

    def _load_images(self, index: int, record: Record) -> list[Image.Image]:
        data = self.image_data(index)
        return [load_image(path, record.id, record.source, d) for path, d in zip(record.images, data)]

    def _tokenize(self, record: Record, sizes: Sequence[tuple[int, int]]) -> dict[str, list[int]]:
        """Token ids and labels of `record`, its images being of (height, width) `sizes`."""
        counts = [self.image_token_count(height, width) for height, width in sizes]
        common = {"record_id": record.id, "source": record.source}
        if isinstance(record, PreferenceRecord):
            return tokenize_preference(
                record.prompt,
                record.chosen,
                record.rejected,
                self.tokenizer,
                self.template,
                counts,
                self.model_max_length,
                **common,
            )
        if isinstance(record, ConversationRecord):
            input_ids, labels = tokenize_conversation(
                record.turns, self.tokenizer, self.template, counts, self.model_max_length, **common
            )
            return {"input_ids": input_ids, "labels": labels}
        if isinstance(record, PromptRecord):
            ids = tokenize_prompt_within(
                record.prompt, self.tokenizer, self.template, counts, self.model_max_length, **common
            )
            return {"input_ids": ids}
        raise TypeError(f"unsupported record type {type(record).__name__}")

    def __getitem__(self, index: int) -> dict[str, Any]:
        tried = 0
        while True:
            record = self.records[index]
            try:
                images = self._load_images(index, record)
                break
            except UnreadableImageError as error:
                if not self.skip_invalid or tried >= len(self):
                    raise
                replacement = self.replacement(index)
                self._log_skip(index, error, replacement)
                index, tried = replacement, tried + 1
        item: dict[str, Any] = {"id": record.id}
        if isinstance(record, PromptRecord):
            item["reward_record"] = record.reward_fields()
        sizes = [(image.height, image.width) for image in images]
        for key, ids in self._tokenize(record, sizes).items():
            item[key] = torch.tensor(ids, dtype=torch.long)
        if images:
            processed = self.image_processor(images=images, return_tensors="pt")
            item["pixel_values"] = processed["pixel_values"]
            item["image_sizes"] = torch.tensor(
                [[image.height, image.width] for image in images], dtype=torch.long
            )
        return item

    def replacement(self, index: int) -> int:
        """The record that stands in for record `index` when its pixels cannot be decoded: the next one
        in the order of blake2b(id) (then position), which depends on the ids only, not on the run."""
        if self._replacement_order is None:
            keys = np.fromiter(
                (
                    int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "big")
                    for i in self.ids
                ),
                dtype=np.uint64,
                count=len(self),
            )
            self._replacement_order = np.argsort(keys, kind="stable")
        order = self._replacement_order
        rank = int(np.flatnonzero(order == index)[0])
        return int(order[(rank + 1) % len(order)])

    def _log_skip(self, index: int, error: RecordError, replacement: int) -> None:
        if index in self._skipped:
            return
        self._skipped.add(index)
        replaced_by = self.records[replacement].id
        logger.warning("%s; replaced by record %r (--skip_invalid)", error, replaced_by)
        if self.skip_log is not None:
            row = {
                "id": error.record_id,
                "file": error.path,
                "reason": error.reason,
                "replaced_by": replaced_by,
            }
            self.skip_log.parent.mkdir(parents=True, exist_ok=True)
            with self.skip_log.open("a") as handle:
                handle.write(json.dumps(row) + "\n")

    def skipped_ids(self) -> set[str]:
        """Ids replaced at load time so far, by any process writing `skip_log` (e.g. during the reference
        pass of the main process): they never reach a batch, so no per-sample cache holds them."""
        if self.skip_log is None or not self.skip_log.is_file():
            return set()
        rows = (json.loads(line) for line in self.skip_log.read_text().splitlines() if line)
        return {row["id"] for row in rows if "replaced_by" in row}

    def check(
        self, index: int, sizes: Callable[[str, Record, bytes | None], tuple[int, int]] | None = None
    ) -> tuple[RecordError | None, list[int], list[tuple[int, int]]]:
        """The pre-training check of record `index`: (error or None, token lengths (one, or chosen and
        rejected), image (height, width) sizes from the headers). `sizes` may cache headers by path."""
        record = self.records[index]
        try:
            data = self.image_data(index)
            if sizes is None:
                found = [probe_image(p, record.id, record.source, d) for p, d in zip(record.images, data)]
            else:
                found = [sizes(p, record, d) for p, d in zip(record.images, data)]
            tokens = self._tokenize(record, found)
        except RecordError as error:
            return error, [], []
        lengths = [len(tokens["input_ids"])]
        if "rejected_input_ids" in tokens:
            lengths.append(len(tokens["rejected_input_ids"]))
        return None, lengths, found

    def invalid_records(self) -> list[tuple[int, RecordError]]:
        """(position in `records`, error) of every record that fails the pre-training check: image files
        exist and open (header only, once per unique path), replies are non-empty, the tokenised
        sequence is within `model_max_length`. Positions identify records even when ids repeat."""
        size = HeaderCache()
        invalid: list[tuple[int, RecordError]] = []
        for position in range(len(self.records)):
            error = self.check(position, size)[0]
            if error is not None:
                invalid.append((position, error))
        logger.info(
            "validated %d records (%d unique image files, headers only): %d with errors",
            len(self.records),
            len(size.headers),
            len(invalid),
        )
        return invalid

    def validate(self) -> list[RecordError]:
        """The errors of `invalid_records()`, in record order."""
        return [error for _, error in self.invalid_records()]
