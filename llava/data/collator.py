"""Batch collation of `MultimodalDataset` items (docs/CONTRACTS.md §3).

The batch holds right-padded `input_ids` (pad id), `labels` (-100) and `attention_mask` (1 real, 0 pad);
for preference items also `rejected_input_ids`, `rejected_labels`, `rejected_attention_mask`, padded to
the SAME length as the chosen side so a trainer can concatenate chosen and rejected into one forward.
`pixel_values` and `image_sizes` are the images of all samples concatenated in sample order (absent when
no sample has images; text-only samples in a mixed batch contribute none). anyres pixel values of shape
`[n, patches, 3, H, W]` with different patch counts are zero-padded along the patch axis, as HF's
LLaVA-OneVision processor does. `sample_ids` lists the record ids.

`PromptCollator` batches GRPO prompt items: `prompt_ids` (a list of unpadded 1-D tensors, since the
generation backend pads them its own way), `reward_records`, `image_counts` (images per prompt), and
the images as above.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from llava.data.tokenization import IGNORE_INDEX

SEQUENCE_KEYS = ("input_ids", "labels", "rejected_input_ids", "rejected_labels")


def _pad(rows: Sequence[torch.Tensor], length: int, value: int) -> torch.Tensor:
    out = torch.full((len(rows), length), value, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out


def _concat_pixel_values(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    shapes = {tuple(t.shape[1:]) for t in tensors}
    if len(shapes) == 1:
        return torch.cat(list(tensors))
    if all(t.ndim == 5 for t in tensors) and len({tuple(t.shape[2:]) for t in tensors}) == 1:
        patches = max(t.shape[1] for t in tensors)
        padded = [torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, patches - t.shape[1])) for t in tensors]
        return torch.cat(padded)
    raise ValueError(f"cannot batch pixel_values of per-image shapes {sorted(shapes)}")


@dataclass(frozen=True)
class DataCollator:
    """Pads and stacks dataset items into a batch (see module docstring)."""

    pad_token_id: int

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        has_rejected = {"rejected_input_ids" in item for item in items}
        if len(has_rejected) != 1:
            raise ValueError(
                "a batch mixes preference and conversation items; keep one record kind per dataset"
            )
        keys = [key for key in SEQUENCE_KEYS if key in items[0]]
        length = max(len(item[key]) for item in items for key in keys)
        batch: dict[str, Any] = {"sample_ids": [str(item["id"]) for item in items]}
        for prefix in ("", "rejected_") if has_rejected == {True} else ("",):
            rows = [item[f"{prefix}input_ids"] for item in items]
            batch[f"{prefix}input_ids"] = _pad(rows, length, self.pad_token_id)
            batch[f"{prefix}labels"] = _pad([item[f"{prefix}labels"] for item in items], length, IGNORE_INDEX)
            batch[f"{prefix}attention_mask"] = _pad([torch.ones_like(row) for row in rows], length, 0)
        with_images = [item for item in items if "pixel_values" in item]
        if with_images:
            batch["pixel_values"] = _concat_pixel_values([item["pixel_values"] for item in with_images])
            batch["image_sizes"] = torch.cat([item["image_sizes"] for item in with_images])
        return batch


@dataclass(frozen=True)
class PromptCollator:
    """Batches GRPO prompt items (see module docstring)."""

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if not items:
            raise ValueError("cannot collate an empty list of items")
        if not all("reward_record" in item for item in items):
            raise ValueError("PromptCollator batches GRPO prompt records (with 'answer'); got other items")
        batch: dict[str, Any] = {
            "sample_ids": [str(item["id"]) for item in items],
            "prompt_ids": [item["input_ids"] for item in items],
            "reward_records": [item["reward_record"] for item in items],
            "image_counts": [len(item["pixel_values"]) if "pixel_values" in item else 0 for item in items],
        }
        with_images = [item for item in items if "pixel_values" in item]
        if with_images:
            batch["pixel_values"] = _concat_pixel_values([item["pixel_values"] for item in with_images])
            batch["image_sizes"] = torch.cat([item["image_sizes"] for item in with_images])
        return batch
