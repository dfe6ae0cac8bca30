"""The exported-encoder format (docs/CONTRACTS.md §1): writing it (its readers: llava.model.checkpoint_io).

Shared by every exporter (llava.export: in-memory MLLMs, HF Llava checkpoints, untrained towers;
llava.export_llava_next: original LLaVA-NeXT/PIVOT checkpoints):

    <export_dir>/vision_encoder/   the tower exactly as the MLLM ran it (config.json, model.safetensors,
                                   preprocessor_config.json)
    <export_dir>/projector/        config.json + model.safetensors (linear_1.*, linear_2.*); absent for a
                                   tower exported without an MLLM (llava.export.export_vision_tower)
    <export_dir>/export.json       provenance and how to read the features (`encoder_metadata`)

Stage-3 projectors with a third, new layer after the two reused Stage-2 layers (llava.model.stage3,
`projector_reuse_layers=2`, no activation between them) are folded into `linear_2`:
`W2' = W3·W2`, `b2' = W3·b2 + b3`, so every projector export has the contract's two layers.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel

import llava.model  # noqa: F401  (registers pivot_multi_tower with the Auto classes)
from llava.model.checkpoint_io import FORMAT_VERSION, MULTI_TOWER_TYPE
from llava.model.encoders import (
    ENCODER_FAMILIES,
    EncoderFamily,
    family_for_config,
    vision_image_processor,
)

logger = logging.getLogger(__name__)

VISUAL_FEATURES = "hidden_states[feature_layer][:, num_prefix_tokens:] of vision_encoder; projector(...) = LLM visual tokens"
LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layers?\.(\d+)\.")


# ---- projector ----------------------------------------------------------------------------------
def fold_projector(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`linear_1`/`linear_2` tensors of a projector; a trailing `linear_3` is folded into `linear_2`."""
    missing = [k for k in ("linear_1.weight", "linear_2.weight") if k not in state]
    if missing:
        raise ValueError(f"projector state lacks {missing}; keys: {sorted(state)}")
    out = {k: v for k, v in state.items() if k.startswith(("linear_1.", "linear_2."))}
    if "linear_3.weight" not in state:
        return out
    w2, w3 = state["linear_2.weight"].double(), state["linear_3.weight"].double()
    dtype = state["linear_2.weight"].dtype
    out["linear_2.weight"] = (w3 @ w2).to(dtype)
    if "linear_2.bias" in state or "linear_3.bias" in state:
        b2 = state.get("linear_2.bias", torch.zeros(w2.shape[0], dtype=dtype)).double()
        b3 = state.get("linear_3.bias", torch.zeros(w3.shape[0], dtype=dtype)).double()
        out["linear_2.bias"] = (w3 @ b2 + b3).to(dtype)
    return out


def write_projector(state: dict[str, torch.Tensor], out_dir: str | Path, act: str = "gelu") -> Path:
    """Write `projector/` (contract config + safetensors) from a projector state dict (folded if needed)."""
    folded = fold_projector(state)
    w1, w2 = folded["linear_1.weight"], folded["linear_2.weight"]
    if w2.shape[1] != w1.shape[0]:
        raise ValueError(
            f"projector layers do not chain: linear_1 {tuple(w1.shape)}, linear_2 {tuple(w2.shape)}"
        )
    config = {
        "projector_type": "mlp2x_gelu",
        "in_features": int(w1.shape[1]),
        "hidden_features": int(w1.shape[0]),
        "out_features": int(w2.shape[0]),
        "act": act,
        "bias": "linear_1.bias" in folded,
    }
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in folded.items()}, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def apply_projector(state: dict[str, torch.Tensor], features: torch.Tensor) -> torch.Tensor:
    """`linear_2(gelu(linear_1(x)))` with the exported tensors (the contract's formula)."""
    hidden = torch.nn.functional.linear(features, state["linear_1.weight"], state.get("linear_1.bias"))
    hidden = torch.nn.functional.gelu(hidden)
    return torch.nn.functional.linear(hidden, state["linear_2.weight"], state.get("linear_2.bias"))


# ---- metadata -----------------------------------------------------------------------------------
def _family_name(tower_config: PretrainedConfig) -> str:
    if tower_config.model_type == MULTI_TOWER_TYPE:
        return "multi_tower"
    return family_for_config(tower_config).name


def image_size_of(tower_config: PretrainedConfig) -> int:
    """The tower config's (square) input resolution."""
    size = getattr(tower_config, "image_size", None)
    if size is None:
        raise ValueError(f"{tower_config.model_type} config has no image_size; cannot describe the export.")
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def encoder_metadata(
    tower_config: PretrainedConfig,
    num_prefix_tokens: int,
    mm_vision_select_layer: int,
    *,
    source_checkpoint: str | None,
    global_step: int,
    loss_type: str | None,
    llm: str | None,
    vision_tower: str,
    encoder_family: str | None = None,
    image_size: int | None = None,
    grid: int | None = None,
) -> dict:
    """The `export.json` payload (docs/CONTRACTS.md §1); `source_checkpoint`, `loss_type` and `llm` are None
    for a tower exported without an MLLM (llava.export.export_vision_tower)."""
    image_size = image_size or image_size_of(tower_config)
    if grid is None:
        if tower_config.model_type == MULTI_TOWER_TYPE:
            grid = int(tower_config.grid)
        else:
            grid = family_for_config(tower_config).grid_size(tower_config, image_size)
    patch_size = int(getattr(tower_config, "patch_size", image_size // grid))
    is_multi = tower_config.model_type == MULTI_TOWER_TYPE
    # A single tower read with its CLS token (cls_patch) gives it to the projector too; wrappers drop prefixes.
    kept = (
        0 if is_multi else family_for_config(tower_config).num_prefix_tokens(tower_config) - num_prefix_tokens
    )
    if kept < 0:
        raise ValueError(
            f"num_prefix_tokens={num_prefix_tokens} exceeds the prefix tokens of the {tower_config.model_type} tower."
        )
    return {
        "format_version": FORMAT_VERSION,
        "source_checkpoint": source_checkpoint,
        "global_step": int(global_step),
        "loss_type": loss_type,
        "llm": llm,
        "vision_tower": vision_tower,
        "encoder_family": encoder_family or _family_name(tower_config),
        "image_size": int(image_size),
        "patch_size": patch_size,
        "grid": [int(grid), int(grid)],
        "tokens_per_image": int(grid) ** 2 + kept,
        "hidden_size": int(tower_config.hidden_size),
        "feature_layer": -1,
        "num_prefix_tokens": int(num_prefix_tokens),
        "mm_vision_select_layer": int(mm_vision_select_layer),
        "visual_features": VISUAL_FEATURES,
        "requires_import": "llava.model" if is_multi else None,
    }


def first_family(tower_config: PretrainedConfig) -> EncoderFamily:
    """The tower's family (a multi-tower's first member: its input is normalised for that one)."""
    if tower_config.model_type == MULTI_TOWER_TYPE:
        return ENCODER_FAMILIES[tower_config.towers[0]["family"]]
    return family_for_config(tower_config)


# ---- writer -------------------------------------------------------------------------------------
def _record_feature_point(config_file: Path, tower_config: PretrainedConfig) -> None:
    """Write `tie_last_hidden_states: false` into a final-norm family's config that lacks it (checkpoints
    from before the flag were read pre-norm), so a transplant never re-reads it after the norm."""
    if tower_config.model_type == MULTI_TOWER_TYPE or family_for_config(tower_config).final_norm is None:
        return
    config = json.loads(config_file.read_text())
    if config.get("tie_last_hidden_states") is None:
        config["tie_last_hidden_states"] = False
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def write_export(
    out_dir: Path,
    tower: PreTrainedModel,
    tower_state: dict[str, torch.Tensor],
    projector_state: dict[str, torch.Tensor] | None,
    image_processor,
    metadata: dict,
    act: str = "gelu",
) -> Path:
    """Write `vision_encoder/`, `projector/` (skipped when `projector_state` is None: a tower exported
    without an MLLM) and `export.json` into `out_dir`."""
    if projector_state is None and (out_dir / "projector").exists():
        raise FileExistsError(
            f"{out_dir / 'projector'} exists: a tower-only export there would sit next to a stale projector "
            "(analysis would read it as this encoder's). Export into a new directory or remove it."
        )
    encoder_dir = out_dir / "vision_encoder"
    tower.save_pretrained(str(encoder_dir), state_dict=tower_state, safe_serialization=True)
    _record_feature_point(encoder_dir / "config.json", tower.config)
    vision_image_processor(
        image_processor, first_family(tower.config), metadata["image_size"]
    ).save_pretrained(str(encoder_dir))
    if projector_state is not None:
        projector_config = json.loads(
            (write_projector(projector_state, out_dir / "projector", act) / "config.json").read_text()
        )
        if projector_config["in_features"] != metadata["hidden_size"]:
            raise ValueError(
                f"projector in_features {projector_config['in_features']} != encoder hidden size "
                f"{metadata['hidden_size']}"
            )
    (out_dir / "export.json").write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info(
        "exported vision encoder%s of %s to %s",
        "" if projector_state is None else " and projector",
        metadata["source_checkpoint"] or metadata["vision_tower"],
        out_dir,
    )
    return out_dir


# ---- checkpoints on disk --------------------------------------------------------------------------
def max_layer(keys) -> int:
    """Number of encoder layers present among tower keys (0 when none are numbered)."""
    indices = [int(m.group(1)) for k in keys if (m := LAYER_KEY.search(k))]
    return max(indices) + 1 if indices else 0


def drop_layers_from(tensors: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
    """Tower tensors without those of encoder layers `keep` and above (truncation)."""
    return {k: v for k, v in tensors.items() if not ((m := LAYER_KEY.search(k)) and int(m.group(1)) >= keep)}


def load_tower_from_tensors(
    config: PretrainedConfig, tensors: dict[str, torch.Tensor], where: str
) -> PreTrainedModel:
    """Build the tower class of `config` from loose tensors through `from_pretrained` (key conversions included).

    Missing weights are an error naming `where`; keys the tower has no place for are reported.
    """
    with tempfile.TemporaryDirectory() as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, f"{tmp}/model.safetensors")
        config.save_pretrained(tmp)
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            tower, info = transformers.AutoModel.from_pretrained(tmp, dtype="auto", output_loading_info=True)
        finally:
            transformers.logging.set_verbosity(verbosity)
    if info["missing_keys"] or info["mismatched_keys"]:
        raise ValueError(
            f"{where}: vision tower weights do not fit {config.model_type}: missing {sorted(info['missing_keys'])[:8]}, "
            f"mismatched {sorted(info['mismatched_keys'])[:8]}."
        )
    if info["unexpected_keys"]:
        logger.warning(
            "%s: %d tower tensors unused: %s",
            where,
            len(info["unexpected_keys"]),
            sorted(info["unexpected_keys"])[:8],
        )
    return tower


def processor_for_checkpoint(
    checkpoint: Path, candidates: list[str], tower_config, image_size: int, base_tile: bool | None = None
):
    """The exported tower's image processor: the first processor config found in the checkpoint, its parent
    or `candidates`, made to agree with the tower (encoders.vision_image_processor), else family defaults."""
    for place in [str(checkpoint), str(checkpoint.parent), *candidates]:
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(place)
        except (OSError, ValueError):
            continue
        logger.info("image processor from %s", place)
        family = first_family(tower_config)
        return vision_image_processor(processor, family, image_size, base_tile=base_tile, where=place)
    logger.warning("%s: no image processor config found; using the encoder family's defaults.", checkpoint)
    return vision_image_processor(None, first_family(tower_config), image_size, base_tile=bool(base_tile))
