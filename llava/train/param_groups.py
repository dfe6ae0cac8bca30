"""Per-module learning rates on the trainable parts (LLaVA-NeXT's `--mm_tunable_parts`, `--mm_*_lr`).

The parts and their freezing rules are the model layer's (llava.model.parts: `mm_vision_tower`,
`mm_mlp_adapter`, `mm_language_model`); they are importable from here too. Optimizer groups: one per
(part, decay/no-decay), with the part's learning rate; norms and biases get no weight decay (HF
Trainer's rule).

The reference code silently ignored the per-module rates under a DeepSpeed config with its own
`optimizer` block (DeepSpeed then builds the optimizer from the config); `check_deepspeed_config`
refuses that combination instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedModel

from llava.model.parts import TUNABLE_PARTS, parse_tunable_parts, part_of, set_trainable_parts

__all__ = [  # the parts' rules live in the model layer (llava.model.parts); the training layer uses them here
    "TUNABLE_PARTS",
    "GroupSpec",
    "build_param_groups",
    "check_deepspeed_config",
    "describe_groups",
    "parse_tunable_parts",
    "part_of",
    "set_trainable_parts",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GroupSpec:
    part: str
    decay: bool
    lr: float
    weight_decay: float
    names: tuple[str, ...]


def _no_decay(name: str, param: torch.nn.Parameter) -> bool:
    lowered = name.lower()
    return param.ndim < 2 or "norm" in lowered or lowered.endswith(".bias") or "image_newline" in lowered


def build_param_groups(
    model: PreTrainedModel,
    learning_rate: float,
    weight_decay: float,
    vision_tower_lr: float | None = None,
    projector_lr: float | None = None,
) -> tuple[list[dict], list[GroupSpec]]:
    """Optimizer parameter groups (for torch optimizers) and their human-readable specs."""
    lrs = {
        "mm_vision_tower": vision_tower_lr if vision_tower_lr is not None else learning_rate,
        "mm_mlp_adapter": projector_lr if projector_lr is not None else learning_rate,
        "mm_language_model": learning_rate,
    }
    buckets: dict[tuple[str, bool], list[tuple[str, torch.nn.Parameter]]] = {}
    for name, param in model.named_parameters():
        if param.requires_grad:
            buckets.setdefault((part_of(name), not _no_decay(name, param)), []).append((name, param))
    groups, specs = [], []
    for (part, decay), items in sorted(buckets.items()):
        wd = weight_decay if decay else 0.0
        groups.append(
            {"params": [p for _, p in items], "lr": lrs[part], "weight_decay": wd, "pivot_part": part}
        )
        specs.append(GroupSpec(part, decay, lrs[part], wd, tuple(n for n, _ in items)))
    return groups, specs


def describe_groups(specs: list[GroupSpec], model: PreTrainedModel) -> str:
    sizes = dict(model.named_parameters())
    lines = ["optimizer parameter groups:"]
    for spec in specs:
        count = sum(sizes[n].numel() for n in spec.names)
        lines.append(
            f"  {spec.part:<18} decay={'yes' if spec.decay else 'no ':<3} lr={spec.lr:.3g} "
            f"wd={spec.weight_decay:g} tensors={len(spec.names)} params={count:,}"
        )
    return "\n".join(lines)


def check_deepspeed_config(deepspeed: str | dict | None, has_module_lrs: bool) -> None:
    """Refuse a DeepSpeed `optimizer` block when per-module learning rates are set (see module docstring)."""
    if not deepspeed:
        return
    config = deepspeed if isinstance(deepspeed, dict) else json.loads(Path(deepspeed).read_text())
    if "optimizer" in config and has_module_lrs:
        raise ValueError(
            f"DeepSpeed config {deepspeed if isinstance(deepspeed, str) else '(dict)'} has an 'optimizer' block, "
            "so DeepSpeed would build the optimizer itself and ignore mm_vision_tower_lr / mm_projector_lr. "
            "Remove the block (scripts/zero2.json and zero3.json have none): the trainer then builds the "
            "optimizer with the per-module groups and DeepSpeed wraps it."
        )
