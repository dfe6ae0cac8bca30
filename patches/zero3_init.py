"""Build or load a model unpartitioned under a ZeRO-3 config; DeepSpeed partitions it at engine start.

Under a ZeRO-3 `TrainingArguments`, transformers 5.x enables `deepspeed.zero.Init` globally, so every
`from_pretrained` / `from_config` partitions parameters as soon as they are created. pivot works on the
model before the DeepSpeed engine exists (assembling the MLLM from an LLM and a tower on the meta device,
scoring reference log-probs, grouping parameters by shape for weight decay), and all three broke on
partitioned parameters: "Cannot copy out of meta tensor", "weight should have at least three
dimensions", and every parameter landing in the no-decay group. Loading with ZeRO-3 init off costs host
memory while loading (each rank holds the full model once, ~15 GB for 7B in bf16) and nothing on the GPU:
`deepspeed.initialize` partitions the model when training starts.

Version-guarded: written against transformers 5.23.0 (it uses the integration's config weak reference);
tests/test_distributed.py runs it under real DeepSpeed where DeepSpeed is installed.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import transformers
from transformers.integrations import deepspeed as hf_deepspeed

logger = logging.getLogger(__name__)

TESTED_TRANSFORMERS = "5.23.0"


@contextmanager
def zero3_init_disabled() -> Iterator[None]:
    """Within the block, models are created with full (unpartitioned) parameters."""
    reference = getattr(hf_deepspeed, "_hf_deepspeed_config_weak_ref", None)
    config = reference() if reference is not None else None
    if config is None:
        yield
        return
    if transformers.__version__ != TESTED_TRANSFORMERS:
        logger.warning("patches.zero3_init was written for transformers %s", TESTED_TRANSFORMERS)
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(config)
