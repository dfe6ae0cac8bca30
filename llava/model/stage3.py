"""Stage 3 (PIVOT evaluation, Song et al. 2025 §5 and Table I): a new LLM on a transplanted, frozen encoder.

The encoder of a Stage-2 MLLM (an export from llava.export; llava.export `resolve_source` exports a
checkpoint on the fly) is attached to a new LLM; the encoder stays frozen through both Stage-3 steps (projector-only
pretraining, then projector + LLM finetuning). `projector_reuse_layers` keeps that many layers of the
Stage-2 projector, frozen, and appends new trainable layers to reach the new LLM's width:

    reuse 0  linear_1 V→N (new)  → GELU → linear_2 N→N (new)                        fresh mlp2x_gelu
    reuse 1  linear_1 V→O (S2)   → GELU → linear_2 O→N (new)                        "1 + 1", the default
    reuse 2  linear_1 V→O (S2)   → GELU → linear_2 O→P (S2) → linear_3 P→N (new)    "2 + 1"

(V: encoder width, O/P: the Stage-2 projector's hidden/output width, N: the new LLM's width; S2 =
copied from Stage 2 and frozen.) Design choices, since HF's `LlavaMultiModalProjector` fixes
`linear_1: V→N, linear_2: N→N` and `LlavaConfig` has no separate projector width:
- The projector is `Stage3Projector`, with HF's parameter names. For reuse 0, and reuse 1 when the new
  LLM is as wide as the old (O = N), it has exactly HF's shapes, so the checkpoint is a stock HF Llava
  checkpoint. Otherwise the shapes differ and `load_stage3_model` (which `python -m llava.train.train`
  uses for any checkpoint whose config has `pivot_projector_reuse_layers`) rebuilds the projector from
  `pivot_projector_dims`. Don't load those checkpoints with a plain `from_pretrained`: with O ≠ N it
  fails on the shapes, and with reuse 2 it drops `linear_3` with only a warning.
- With reuse 2 the new layer directly follows the frozen Stage-2 output (no activation between
  them). That keeps the whole Stage-2 projector and its output space, and the export folds the new
  layer into `linear_2` (llava.export.fold_projector), so every export has the contract's two layers.
- Frozen means `requires_grad=False` and absent from the optimizer, re-applied after every load
  (`freeze_stage3`), so both Stage-3 steps leave the encoder and the reused layers bit-identical. The
  reference code also trained the LLM in its "projector-only" step and did not freeze reused layers.

Knobs recorded in config.json: `pivot_projector_reuse_layers`, `pivot_projector_dims` ([in, out] per
linear layer) and `pivot_stage3_source`. Multi-tower encoders (`requires_import` in export.json:
ensembles, DINOv2 with registers or read after its final norm, ConvNeXt) are transplanted as the
`pivot_multi_tower` they were exported as. An encoder exported with its CLS token kept
(`mm_vision_select_feature` cls_patch) can only feed a square model.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.activations import ACT2FN

from llava.model.builder import ASPECT_RATIOS, DTYPES, ModelConfig, build_model
from llava.model.chat_template import set_training_chat_template
from llava.model.checkpoint_io import (
    MULTI_TOWER_TYPE,
    PROJECTOR_PREFIXES,
    load_projector,
    read_export,
    read_tensors,
)
from llava.model.encoders import family_for_config
from llava.model.parts import freeze_unused_vision_parts, trainable_counts

logger = logging.getLogger(__name__)

REUSE_CHOICES = (0, 1, 2)


def reused_prefixes(reuse_layers: int) -> tuple[str, ...]:
    """Parameter-name prefixes of the reused (frozen) projector layers."""
    return tuple(f"linear_{i}." for i in range(1, reuse_layers + 1))


def projector_dims(
    vision_hidden: int, stage2_hidden: int, stage2_out: int, llm_hidden: int, reuse_layers: int
) -> list[list[int]]:
    """[in, out] of each linear layer of the Stage-3 projector (module docstring)."""
    if reuse_layers == 0:
        return [[vision_hidden, llm_hidden], [llm_hidden, llm_hidden]]
    if reuse_layers == 1:
        return [[vision_hidden, stage2_hidden], [stage2_hidden, llm_hidden]]
    if reuse_layers == 2:
        return [[vision_hidden, stage2_hidden], [stage2_hidden, stage2_out], [stage2_out, llm_hidden]]
    raise ValueError(f"projector_reuse_layers={reuse_layers}; choose one of {REUSE_CHOICES}.")


class Stage3Projector(torch.nn.Module):
    """`linear_1 → act → linear_2 [→ linear_3]` with HF's parameter names (module docstring)."""

    def __init__(self, dims: list[list[int]], act: str = "gelu", bias: bool = True) -> None:
        super().__init__()
        if not 2 <= len(dims) <= 3 or any(a[1] != b[0] for a, b in zip(dims, dims[1:])):
            raise ValueError(f"projector dims {dims} must be 2 or 3 chained [in, out] pairs.")
        self.dims = [list(map(int, d)) for d in dims]
        self.linear_1 = torch.nn.Linear(*self.dims[0], bias=bias)
        self.act = ACT2FN[act]
        self.linear_2 = torch.nn.Linear(*self.dims[1], bias=bias)
        self.linear_3 = torch.nn.Linear(*self.dims[2], bias=bias) if len(self.dims) == 3 else None

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        hidden = self.linear_2(self.act(self.linear_1(image_features)))
        return self.linear_3(hidden) if self.linear_3 is not None else hidden


@dataclass
class Stage3Config:
    """What Stage 3 builds: a new LLM on the frozen encoder of `source`."""

    source: str
    """Stage-2 checkpoint directory, or an exported-encoder directory (llava.export)."""
    llm: str
    """The new LLM: preset, hub id or directory."""
    projector_reuse_layers: int = 1
    """Frozen Stage-2 projector layers kept (0, 1, 2); new trainable layers reach the new LLM's width."""
    image_aspect_ratio: str = "square"
    """"square" (paper) or "anyres_max_9"."""
    dtype: str = "float32"
    """Weights dtype: float32 (CPU), bfloat16 (GPU)."""
    attn_implementation: str | None = None
    """LLM attention kernel (None: transformers' default)."""

    def __post_init__(self) -> None:
        if self.projector_reuse_layers not in REUSE_CHOICES:
            raise ValueError(
                f"projector_reuse_layers={self.projector_reuse_layers}; choose one of {REUSE_CHOICES}."
            )
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio={self.image_aspect_ratio!r}; choose one of {ASPECT_RATIOS}."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {tuple(DTYPES)}.")


def _select_feature(export_dir: Path, meta: dict, image_aspect_ratio: str) -> str:
    """The builder's `mm_vision_select_feature` that drops the export's `num_prefix_tokens`."""
    wanted = int(meta["num_prefix_tokens"])
    tower_config = transformers.AutoConfig.from_pretrained(str(export_dir / "vision_encoder"))
    if tower_config.model_type == MULTI_TOWER_TYPE:  # the wrapper drops every prefix token itself
        prefix = 0
    else:
        family = family_for_config(tower_config)
        if family.final_norm is not None and getattr(tower_config, "tie_last_hidden_states", None) is None:
            raise ValueError(
                f"{export_dir}: this {family.name} export does not say whether its features follow the final "
                f"{family.final_norm} (no tie_last_hidden_states in vision_encoder/config.json; it predates "
                "that record). Re-export the Stage-2 checkpoint with `python -m llava.export`."
            )
        prefix = family.num_prefix_tokens(tower_config)
    if wanted == prefix:
        return "patch"
    if wanted == 0 and prefix == 1:
        if image_aspect_ratio != "square":
            raise ValueError(
                f"{export_dir}: the Stage-2 model kept the CLS token (mm_vision_select_feature cls_patch), which "
                f"image_aspect_ratio={image_aspect_ratio!r} cannot tile; build the Stage-3 model with 'square'."
            )
        return "cls_patch"
    raise ValueError(f"{export_dir}: num_prefix_tokens={wanted} but the tower has {prefix} prefix token(s).")


def stage3_model_config(cfg: Stage3Config, export_dir: str | Path) -> ModelConfig:
    """The builder's config of a Stage-3 model: `cfg.llm` on the exported encoder of `export_dir`."""
    export_dir = Path(export_dir)
    return ModelConfig(
        llm=cfg.llm,
        vision_tower=str(export_dir / "vision_encoder"),
        mm_vision_select_layer=-1,  # the export is already truncated to the layer the projector reads
        mm_vision_select_feature=_select_feature(export_dir, read_export(export_dir), cfg.image_aspect_ratio),
        image_aspect_ratio=cfg.image_aspect_ratio,
        dtype=cfg.dtype,
        attn_implementation=cfg.attn_implementation,
    )


def build_stage3_model(
    cfg: Stage3Config, export_dir: str | Path
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, object]:
    """New LLM + frozen transplanted encoder + `Stage3Projector`; returns (model, tokenizer, image_processor).

    `export_dir` is the exported encoder of `cfg.source`: the source itself when it is an export, else
    its export (llava.export `resolve_source` exports a checkpoint source on the fly).
    """
    export_dir = Path(export_dir)
    meta = read_export(export_dir)
    model, tokenizer, image_processor = build_model(stage3_model_config(cfg, export_dir))
    projector_config, stage2_state = load_projector(export_dir / "projector")
    vision_hidden = int(model.config.vision_config.hidden_size)
    if projector_config["in_features"] != vision_hidden:
        raise ValueError(
            f"{export_dir}: projector in_features {projector_config['in_features']} != encoder width {vision_hidden}."
        )
    dims = projector_dims(
        vision_hidden,
        int(projector_config["hidden_features"]),
        int(projector_config["out_features"]),
        int(model.config.text_config.hidden_size),
        cfg.projector_reuse_layers,
    )
    projector = Stage3Projector(dims, model.config.projector_hidden_act, bool(projector_config["bias"]))
    reused = {
        k: v for k, v in stage2_state.items() if k.startswith(reused_prefixes(cfg.projector_reuse_layers))
    }
    result = projector.load_state_dict(reused, strict=False)
    expected_missing = {
        k for k in projector.state_dict() if not k.startswith(reused_prefixes(cfg.projector_reuse_layers))
    }
    if set(result.missing_keys) != expected_missing:
        raise ValueError(
            f"{export_dir}: reused projector tensors incomplete: missing {sorted(result.missing_keys)}."
        )
    model.model.multi_modal_projector = projector.to(DTYPES[cfg.dtype])
    model.config.pivot_projector_reuse_layers = cfg.projector_reuse_layers
    model.config.pivot_projector_dims = dims
    model.config.pivot_stage3_source = str(Path(cfg.source).resolve())
    model.config.mm_vision_select_layer = int(meta["mm_vision_select_layer"])
    freeze_stage3(model, ("mm_mlp_adapter", "mm_language_model"))
    logger.info(
        "Stage 3: encoder of %s on %s, projector %s with %d reused frozen layer(s)",
        cfg.source,
        cfg.llm,
        dims,
        cfg.projector_reuse_layers,
    )
    return model, tokenizer, image_processor


def is_stage3(config: PretrainedConfig) -> bool:
    """Whether a model config describes a Stage-3 model (it has a `Stage3Projector`)."""
    return getattr(config, "pivot_projector_reuse_layers", None) is not None


def load_stage3_model(
    path: str | Path, dtype: str = "float32", attn_implementation: str | dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, object]:
    """Load a Stage-3 checkpoint: HF Llava loading, then the projector rebuilt from `pivot_projector_dims`."""
    path = Path(path)
    config = transformers.AutoConfig.from_pretrained(str(path))
    if not is_stage3(config):
        raise ValueError(f"{path}: config has no pivot_projector_reuse_layers (not a Stage-3 checkpoint).")
    model_class = (
        transformers.LlavaOnevisionForConditionalGeneration
        if config.model_type == "llava_onevision"
        else transformers.LlavaForConditionalGeneration
    )
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the stock projector's shapes may not match: it is replaced
    try:
        model = model_class.from_pretrained(
            str(path),
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            ignore_mismatched_sizes=True,
        )
    finally:
        transformers.logging.set_verbosity(verbosity)
    found = read_tensors(path, PROJECTOR_PREFIXES)
    state = next((tensors for tensors in found.values() if tensors), None)
    if state is None:
        raise ValueError(f"{path}: no multi_modal_projector tensors in the checkpoint.")
    projector = Stage3Projector(
        config.pivot_projector_dims, config.projector_hidden_act, config.multimodal_projector_bias
    )
    projector.load_state_dict(state, strict=True)
    model.model.multi_modal_projector = projector.to(DTYPES[dtype])
    freeze_unused_vision_parts(model)
    freeze_stage3(model, ("mm_mlp_adapter", "mm_language_model"))
    model.config.use_cache = False
    tokenizer = set_training_chat_template(transformers.AutoTokenizer.from_pretrained(str(path)))
    image_processor = transformers.AutoImageProcessor.from_pretrained(str(path))
    return model, tokenizer, image_processor


def freeze_stage3(model: PreTrainedModel, parts: tuple[str, ...]) -> dict[str, int]:
    """Freeze the encoder and the reused projector layers; returns trainable parameter counts per part.

    Call it after `set_trainable_parts` (which sets `requires_grad` by part). Asking to train the
    vision tower in Stage 3 is an error.
    """
    if "mm_vision_tower" in parts:
        raise ValueError(
            "Stage 3 keeps the transplanted encoder frozen: remove mm_vision_tower from --mm_tunable_parts."
        )
    model.model.vision_tower.requires_grad_(False)
    prefixes = reused_prefixes(int(model.config.pivot_projector_reuse_layers))
    for name, param in model.model.multi_modal_projector.named_parameters():
        if name.startswith(prefixes):
            param.requires_grad_(False)
    return trainable_counts(model)
