"""Read an HF checkpoint's tensors under a model's own parameter names (for Trainer resume).

transformers 5.x `save_pretrained` writes Llava checkpoints with the original key names
(`language_model.model.*`, `multi_modal_projector.*`), and `from_pretrained` renames them on load;
`Trainer._load_from_checkpoint` does a raw non-strict `load_state_dict` instead, so on resume no Llava
weight matched and training silently went on from the initial weights (transformers#43701). This
applies the model's own loading renamings (`conversion_mapping`, internal modules) to the saved keys.

Version-guarded: written against transformers 5.23.0 (the pinned version); another version logs a
warning once, and the strict load in `PivotTrainer._load_from_checkpoint` still fails loudly on any
mismatch. Test: tests/test_trainer_io.py (resume equals an uninterrupted run).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from transformers import PreTrainedModel
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightRenaming, rename_source_key
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME

logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = "5.23.0"


@functools.cache
def _check_version() -> None:
    if transformers.__version__ != TESTED_TRANSFORMERS:
        logger.warning(
            "patches.checkpoint_keys was written for transformers %s, found %s: check resume still "
            "restores weights (tests/test_trainer_io.py).",
            TESTED_TRANSFORMERS,
            transformers.__version__,
        )


def safetensors_files(checkpoint: str | Path) -> list[Path]:
    """The safetensors weight files of a checkpoint directory (single file or sharded index)."""
    checkpoint = Path(checkpoint)
    if (checkpoint / SAFE_WEIGHTS_NAME).is_file():
        return [checkpoint / SAFE_WEIGHTS_NAME]
    index = checkpoint / SAFE_WEIGHTS_INDEX_NAME
    if index.is_file():
        return [
            checkpoint / name for name in sorted(set(json.loads(index.read_text())["weight_map"].values()))
        ]
    return []


def checkpoint_state_for(model: PreTrainedModel, files: list[Path]) -> dict[str, torch.Tensor]:
    """Checkpoint tensors under the model's own parameter names (the renamings `from_pretrained` applies)."""
    _check_version()
    conversions = get_model_conversion_mapping(model)
    if any(not isinstance(c, WeightRenaming) for c in conversions):
        raise NotImplementedError(
            f"{type(model).__name__}: resume handles key renamings only, not weight converters."
        )
    state = {}
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                state[rename_source_key(key, conversions, [])[0]] = handle.get_tensor(key)
    return state
