"""Export the vision encoder and projector of an original LLaVA-NeXT / PIVOT checkpoint (docs/CONTRACTS.md §1).

Used by `llava.export.export_checkpoint` for `config.json` `model_type` `llava_qwen`, `llava_llama`, ...
(any config with `mm_vision_tower` / `mm_projector_type`); the LLM is never loaded:

- `model.vision_tower.vision_tower.<k>` → tower key `<k>` (the HF tower's hub layout, e.g.
  `vision_model.encoder.layers.3.mlp.fc1.weight`); `model.mm_projector.0.*` → `linear_1.*` and
  `model.mm_projector.2.*` → `linear_2.*` (index 1 is the GELU).
- The tower config comes from `--vision_config` or else `config.mm_vision_tower` (a local directory or
  the HF cache). Depth: when the checkpoint holds fewer encoder layers than that config (LLaVA-NeXT's
  SigLIP tower deletes its last layer and reads the last hidden state) the tower keeps exactly those
  layers; otherwise it is truncated at `mm_vision_select_layer`.
- Families with a final norm (DINOv2) are read as PIVOT/Cambrian read them: the full tower's
  `last_hidden_state`, whatever `mm_vision_select_layer` says (exported as the one-member
  `pivot_multi_tower` the MLLM would run).
- `mm_vision_select_feature: patch` drops the family's prefix tokens (CLS), `cls_patch` keeps them.
- `image_aspect_ratio: anyres*` exports the base-tile (direct resize) processor.
"""

from __future__ import annotations

import logging
from pathlib import Path

import transformers

from llava.export_io import (
    drop_layers_from,
    encoder_metadata,
    image_size_of,
    load_tower_from_tensors,
    max_layer,
    processor_for_checkpoint,
    write_export,
)
from llava.model.checkpoint_io import read_tensors
from llava.model.encoders import (
    family_for_config,
    resolve_select_layer,
    truncated_vision_config,
    vision_config_of,
)
from llava.model.multi_tower import PivotMultiTower, needs_wrapper

logger = logging.getLogger(__name__)

NEXT_TOWER_PREFIX = "model.vision_tower.vision_tower."
NEXT_PROJECTOR_KEYS = {"0": "linear_1", "2": "linear_2"}
NEXT_PROJECTOR_PREFIX = "model.mm_projector."


def export_llava_next(
    checkpoint: Path,
    raw: dict,
    out_dir: Path,
    loss_type: str | None,
    global_step: int,
    vision_config: str | None,
) -> Path:
    """Export `checkpoint` (its parsed config.json: `raw`) into `out_dir`; `vision_config` overrides
    `mm_vision_tower` as the source of the tower config and image processor (module docstring)."""
    source = vision_config or raw.get("mm_vision_tower")
    if not source:
        raise ValueError(f"{checkpoint}: config.json names no mm_vision_tower; pass --vision_config.")
    try:
        full_config = transformers.AutoConfig.from_pretrained(source)
    except OSError as error:
        raise ValueError(
            f"{checkpoint}: cannot read the vision tower config {source!r} ({error}); pass --vision_config with the "
            "directory (or config.json) of the original tower."
        ) from error
    if raw.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ValueError(
            f"{checkpoint}: mm_projector_type={raw['mm_projector_type']!r}; only mlp2x_gelu is exported."
        )
    found = read_tensors(checkpoint, (NEXT_TOWER_PREFIX, NEXT_PROJECTOR_PREFIX))
    tower_tensors, raw_projector = found[NEXT_TOWER_PREFIX], found[NEXT_PROJECTOR_PREFIX]
    if not tower_tensors or not raw_projector:
        raise ValueError(
            f"{checkpoint}: no {NEXT_TOWER_PREFIX}* / {NEXT_PROJECTOR_PREFIX}* tensors (LLaVA-NeXT layout)."
        )
    projector_state = {}
    for key, value in raw_projector.items():
        index, _, name = key.partition(".")
        if index not in NEXT_PROJECTOR_KEYS:
            raise ValueError(
                f"{checkpoint}: unexpected projector tensor {NEXT_PROJECTOR_PREFIX}{key} for mlp2x_gelu."
            )
        projector_state[f"{NEXT_PROJECTOR_KEYS[index]}.{name}"] = value
    family = family_for_config(full_config)
    depth = family.depth(vision_config_of(full_config))
    present = max_layer(tower_tensors)
    configured = int(raw.get("mm_vision_select_layer", family.default_select_layer))
    select_layer = present - depth - 1 if 0 < present < depth else configured
    if family.final_norm is not None and not 0 < present < depth:
        logger.info(
            "%s: %s towers are read after their final %s in PIVOT/Cambrian (last_hidden_state), whatever "
            "mm_vision_select_layer (%d) says; exporting that feature point.",
            checkpoint,
            family.name,
            family.final_norm,
            configured,
        )
        select_layer = -1
    tower_config, family = truncated_vision_config(full_config, select_layer)
    kept = resolve_select_layer(select_layer, depth)
    tower = load_tower_from_tensors(tower_config, drop_layers_from(tower_tensors, kept), str(checkpoint))
    keep_cls = raw.get("mm_vision_select_feature", "patch") == "cls_patch"
    prefix = 0 if keep_cls else family.num_prefix_tokens(tower.config)
    if needs_wrapper(tower, family):
        if keep_cls:
            raise ValueError(
                f"{checkpoint}: mm_vision_select_feature cls_patch with a {family.name} tower read through "
                "PivotMultiTower (which drops prefix tokens) cannot be exported."
            )
        size = image_size_of(tower.config)
        tower = PivotMultiTower.from_members(
            [(tower, family.name, size, family.grid_size(tower.config, size))]
        )
        prefix = 0
    metadata = encoder_metadata(
        tower.config,
        prefix,
        select_layer,
        source_checkpoint=str(checkpoint.resolve()),
        global_step=global_step,
        loss_type=loss_type or "unknown",
        llm=str(raw.get("_name_or_path") or "unknown"),
        vision_tower=str(raw.get("mm_vision_tower") or source),
        encoder_family=None if isinstance(tower, PivotMultiTower) else family.name,
    )
    anyres = str(raw.get("image_aspect_ratio", "")).startswith("anyres")
    processor = processor_for_checkpoint(
        checkpoint, [source], tower.config, metadata["image_size"], base_tile=anyres
    )
    return write_export(out_dir, tower, tower.state_dict(), projector_state, processor, metadata, "gelu")
