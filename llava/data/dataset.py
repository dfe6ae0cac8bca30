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
the image, the data file and the record, when the item is loaded during training.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from llava.data.errors import RecordError
from llava.data.images import load_image, probe_image
from llava.data.records import ConversationRecord, PreferenceRecord, PromptRecord, Record
from llava.data.templates import get_template
from llava.data.tokenization import tokenize_conversation, tokenize_preference, tokenize_prompt_within

logger = logging.getLogger(__name__)

ImageProcessor = Callable[..., Mapping[str, Any]]


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
    ) -> None:
        if model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {model_max_length}")
        self.records = list(records)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = get_template(template)
        self.image_token_count = image_token_count
        self.model_max_length = model_max_length

    @property
    def ids(self) -> list[str]:
        """Record ids in dataset order."""
        return [record.id for record in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def _load_images(self, record: Record) -> list[Image.Image]:
        return [load_image(path, record.id, record.source) for path in record.images]

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
        record = self.records[index]
        images = self._load_images(record)
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

    def invalid_records(self) -> list[tuple[int, RecordError]]:
        """(position in `records`, error) of every record that fails the pre-training check: image files
        exist and open (header only, once per unique path), replies are non-empty, the tokenised
        sequence is within `model_max_length`. Positions identify records even when ids repeat."""
        headers: dict[str, tuple[int, int] | RecordError] = {}

        def size(path: str, record: Record) -> tuple[int, int]:
            if path not in headers:
                try:
                    headers[path] = probe_image(path, record.id, record.source)
                except RecordError as error:
                    headers[path] = error
            found = headers[path]
            if isinstance(found, RecordError):
                raise type(found)(record.source, record.id, found.reason)
            return found

        invalid: list[tuple[int, RecordError]] = []
        for position, record in enumerate(self.records):
            try:
                self._tokenize(record, [size(path, record) for path in record.images])
            except RecordError as error:
                invalid.append((position, error))
        logger.info(
            "validated %d records (%d unique image files, headers only): %d with errors",
            len(self.records),
            len(headers),
            len(invalid),
        )
        return invalid

    def validate(self) -> list[RecordError]:
        """The errors of `invalid_records()`, in record order."""
        return [error for _, error in self.invalid_records()]
