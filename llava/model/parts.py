"""The MLLM's tunable parts and its freezing rules (LLaVA-NeXT's `--mm_tunable_parts`).

Parts: `mm_vision_tower` (the vision tower), `mm_mlp_adapter` (projector, plus OneVision's
`image_newline`), `mm_language_model` (LLM body and LM head). Parameters not on the feature path stay
frozen whatever the parts (`freeze_unused_vision_parts`, llava.model.encoders `prepare_tower`); it is
re-applied after every load, since `requires_grad` is not saved. The training layer builds its
optimizer groups on these names (llava.train.param_groups); Stage 3 (llava.model.stage3) adds its own
freezing on top.
"""

from __future__ import annotations

from transformers import PreTrainedModel

from llava.model.encoders import ENCODER_FAMILIES, prepare_tower
from llava.model.multi_tower import PivotMultiTower

TUNABLE_PARTS = ("mm_vision_tower", "mm_mlp_adapter", "mm_language_model")


def parse_tunable_parts(text: str) -> tuple[str, ...]:
    """A comma-separated subset of `TUNABLE_PARTS`, checked."""
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    unknown = [p for p in parts if p not in TUNABLE_PARTS]
    if unknown or not parts:
        raise ValueError(f"mm_tunable_parts={text!r}: choose a comma-separated subset of {TUNABLE_PARTS}.")
    return parts


def part_of(name: str) -> str:
    """Which tunable part a parameter name belongs to."""
    if ".vision_tower." in f".{name}":
        return "mm_vision_tower"
    if "multi_modal_projector" in name or name.endswith("image_newline"):
        return "mm_mlp_adapter"
    return "mm_language_model"


def freeze_unused_vision_parts(model: PreTrainedModel) -> None:
    """Re-apply the family's freezing after `from_pretrained` (requires_grad is not saved)."""
    tower = model.model.vision_tower
    if isinstance(tower, PivotMultiTower):
        for member, spec in zip(tower.members, tower.config.towers):
            prepare_tower(member, ENCODER_FAMILIES[spec["family"]])
        return
    family = ENCODER_FAMILIES.get(getattr(model.config, "pivot_encoder_family", ""))
    if family is not None:
        prepare_tower(tower, family)


def trainable_counts(model: PreTrainedModel) -> dict[str, int]:
    """Trainable parameter counts per part."""
    counts = dict.fromkeys(TUNABLE_PARTS, 0)
    for name, param in model.named_parameters():
        if param.requires_grad:
            counts[part_of(name)] += param.numel()
    return counts


def set_trainable_parts(model: PreTrainedModel, parts: tuple[str, ...]) -> dict[str, int]:
    """Set requires_grad by part; returns trainable parameter counts per part."""
    for name, param in model.named_parameters():
        param.requires_grad_(part_of(name) in parts)
    freeze_unused_vision_parts(model)
    return trainable_counts(model)
