"""Export the vision encoder and projector of an MLLM as standalone checkpoints (docs/CONTRACTS.md §1).

    python -m llava.export CHECKPOINT OUT_DIR        (console script: pivot-export)

writes

    OUT_DIR/vision_encoder/   HF model directory (config.json, model.safetensors, preprocessor_config.json):
                              the tower exactly as the MLLM ran it, already truncated to the layer it read
    OUT_DIR/projector/        config.json {"projector_type": "mlp2x_gelu", "in_features", "hidden_features",
                              "out_features", "act", "bias"} + model.safetensors (linear_1.*, linear_2.*)
    OUT_DIR/export.json       provenance and how to read the features (DESIGN §5 "Encoder export")

The visual tokens the projector received are
`AutoModel.from_pretrained(vision_encoder)(pixel_values, output_hidden_states=True)
.hidden_states[feature_layer][:, num_prefix_tokens:]` and the LLM's visual tokens are
`linear_2(gelu(linear_1(features)))`. Plain towers load with transformers alone; multi-tower ensembles
(`model_type: pivot_multi_tower`) need `import llava.model` first (`export.json["requires_import"]`).
Towers read after their final norm (llava.model.encoders: DINOv2, MAE, MoCo/supervised ViT at the last
layer) keep that formula: ViT-layout towers carry `tie_last_hidden_states: true`, so transformers returns
the post-norm state as `hidden_states[-1]`; DINOv2 is exported as the single-member `pivot_multi_tower`
the MLLM ran. `tokens_per_image` counts a CLS token kept by `mm_vision_select_feature: cls_patch`.
`vision_encoder/`'s image processor gives one image exactly the pixels the MLLM's tower saw: the MLLM's
processor made to agree with the tower (encoders.conform_image_processor), or for anyres models a direct
resize equal to LlavaOnevisionImageProcessor's base tile.

Two entry points share one writer:
- `export_model(model, image_processor, out_dir, ...)`: an in-memory MLLM (the training callback,
  llava.train.callbacks). Under DeepSpeed ZeRO-3 every process gathers the partitioned weights and
  only the main process writes.
- `export_checkpoint(checkpoint, out_dir)`: a checkpoint on disk, read tensor by tensor (the LLM is
  never loaded). Two layouts are recognised:

  1. pivot / HF Llava (`config.json` `model_type` `llava` or `llava_onevision`): tensors under
     `model.vision_tower.*` (or the legacy `vision_tower.*`) form the tower, whose config is
     `config.vision_config`; `model.multi_modal_projector.linear_{1,2}.*` (or legacy
     `multi_modal_projector.*`) form the projector. A tower not yet truncated
     (`vision_feature_layer != -1`, e.g. stock llava-hf checkpoints) is truncated to that layer.
  2. original LLaVA-NeXT / PIVOT (`model_type` `llava_qwen`, `llava_llama`, ...):
     `model.vision_tower.vision_tower.<k>` → tower key `<k>` (the HF tower's hub layout, e.g.
     `vision_model.encoder.layers.3.mlp.fc1.weight`); `model.mm_projector.0.*` → `linear_1.*` and
     `model.mm_projector.2.*` → `linear_2.*` (index 1 is the GELU). The tower config comes from
     `--vision_config` or else `config.mm_vision_tower` (a local directory or the HF cache). Depth:
     when the checkpoint holds fewer encoder layers than that config (LLaVA-NeXT's SigLIP tower deletes
     its last layer and reads the last hidden state) the tower keeps exactly those layers; otherwise it
     is truncated at `mm_vision_select_layer`. Families with a final norm (DINOv2) are read as
     PIVOT/Cambrian read them: the full tower's `last_hidden_state`, whatever `mm_vision_select_layer`
     says. `mm_vision_select_feature: patch` drops the family's prefix tokens (CLS), `cls_patch` keeps
     them. `image_aspect_ratio: anyres*` exports the base-tile (direct resize) processor.

Stage-3 projectors with a third, new layer after the two reused Stage-2 layers (llava.model.stage3,
`projector_reuse_layers=2`, no activation between them) are folded into `linear_2`:
`W2' = W3·W2`, `b2' = W3·b2 + b3`, so every projector export has the contract's two layers.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import PretrainedConfig, PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled

import llava.model  # noqa: F401  (registers pivot_multi_tower with the Auto classes)
from llava.model.encoders import (
    ENCODER_FAMILIES,
    EncoderFamily,
    family_for_config,
    resolve_select_layer,
    truncated_vision_config,
    vision_config_of,
    vision_image_processor,
)
from llava.model.multi_tower import PivotMultiTower, needs_wrapper

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
VISUAL_FEATURES = "hidden_states[feature_layer][:, num_prefix_tokens:] of vision_encoder; projector(...) = LLM visual tokens"
HF_LLAVA_TYPES = ("llava", "llava_onevision")
MULTI_TOWER_TYPE = "pivot_multi_tower"
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")
NEXT_TOWER_PREFIX = "model.vision_tower.vision_tower."
NEXT_PROJECTOR_KEYS = {"0": "linear_1", "2": "linear_2"}
NEXT_PROJECTOR_PREFIX = "model.mm_projector."
LAYER_KEY = re.compile(r"(?:^|\.)encoder\.layers?\.(\d+)\.")


# ---- gathering (DeepSpeed ZeRO-3) -------------------------------------------------------------------
@contextmanager
def gathered_parameters(module: torch.nn.Module) -> Iterator[None]:
    """Full weights inside the block, also when ZeRO-3 partitions them (a collective: every rank enters)."""
    if not is_deepspeed_zero3_enabled():
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
        yield


def cpu_state_dict(module: torch.nn.Module, is_main_process: bool = True) -> dict[str, torch.Tensor] | None:
    """A CPU copy of the module's full state dict on the main process (None elsewhere)."""
    with gathered_parameters(module):
        if not is_main_process:
            return None
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


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


def load_projector(projector_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of an exported `projector/` directory."""
    from safetensors.torch import load_file

    path = Path(projector_dir)
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


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


def _image_size(tower_config: PretrainedConfig) -> int:
    size = getattr(tower_config, "image_size", None)
    if size is None:
        raise ValueError(f"{tower_config.model_type} config has no image_size; cannot describe the export.")
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def encoder_metadata(
    tower_config: PretrainedConfig,
    num_prefix_tokens: int,
    mm_vision_select_layer: int,
    *,
    source_checkpoint: str,
    global_step: int,
    loss_type: str,
    llm: str,
    vision_tower: str,
    encoder_family: str | None = None,
    image_size: int | None = None,
    grid: int | None = None,
) -> dict:
    """The `export.json` payload (docs/CONTRACTS.md §1)."""
    image_size = image_size or _image_size(tower_config)
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


def _first_family(tower_config: PretrainedConfig) -> EncoderFamily:
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


def _write_export(
    out_dir: Path,
    tower: PreTrainedModel,
    tower_state: dict[str, torch.Tensor],
    projector_state: dict[str, torch.Tensor],
    image_processor,
    metadata: dict,
    act: str,
) -> Path:
    encoder_dir = out_dir / "vision_encoder"
    tower.save_pretrained(str(encoder_dir), state_dict=tower_state, safe_serialization=True)
    _record_feature_point(encoder_dir / "config.json", tower.config)
    vision_image_processor(
        image_processor, _first_family(tower.config), metadata["image_size"]
    ).save_pretrained(str(encoder_dir))
    projector_config = json.loads(
        (write_projector(projector_state, out_dir / "projector", act) / "config.json").read_text()
    )
    if projector_config["in_features"] != metadata["hidden_size"]:
        raise ValueError(
            f"projector in_features {projector_config['in_features']} != encoder hidden size {metadata['hidden_size']}"
        )
    (out_dir / "export.json").write_text(json.dumps(metadata, indent=2) + "\n")
    logger.info("exported vision encoder and projector of %s to %s", metadata["source_checkpoint"], out_dir)
    return out_dir


def export_model(
    model: PreTrainedModel,
    image_processor,
    out_dir: str | Path,
    *,
    source_checkpoint: str | Path,
    global_step: int = -1,
    loss_type: str = "unknown",
    is_main_process: bool = True,
) -> Path:
    """Export an in-memory MLLM; every process must call it under ZeRO-3, only the main one writes."""
    config = model.config
    if config.vision_feature_layer != -1:
        raise ValueError(
            f"vision_feature_layer={config.vision_feature_layer}: export_model expects the tower truncated to the "
            "layer it feeds (pivot models); use export_checkpoint for other checkpoints."
        )
    tower = model.model.vision_tower
    tower_state = cpu_state_dict(tower, is_main_process)
    projector_state = cpu_state_dict(model.model.multi_modal_projector, is_main_process)
    if not is_main_process:
        return Path(out_dir)
    metadata = encoder_metadata(
        tower.config,
        1 if config.vision_feature_select_strategy == "default" else 0,
        int(getattr(config, "mm_vision_select_layer", -1)),
        source_checkpoint=str(Path(source_checkpoint).resolve()),
        global_step=global_step,
        loss_type=loss_type,
        llm=str(getattr(config, "mm_language_model", None) or config.text_config._name_or_path or "unknown"),
        vision_tower=str(getattr(config, "mm_vision_tower", None) or tower.config._name_or_path or "unknown"),
        encoder_family=getattr(config, "pivot_encoder_family", None),
        image_size=getattr(config, "pivot_image_size", None),
        grid=getattr(config, "pivot_grid", None),
    )
    return _write_export(
        Path(out_dir),
        tower,
        tower_state,
        projector_state,
        image_processor,
        metadata,
        config.projector_hidden_act,
    )


# ---- checkpoints on disk --------------------------------------------------------------------------
def _checkpoint_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{checkpoint}: no *.safetensors weights (export reads safetensors checkpoints only)."
        )
    return files


def read_tensors(checkpoint: Path, prefixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors under each prefix (prefix stripped), reading only those keys."""
    found: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for file in _checkpoint_files(checkpoint):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                prefix = next((p for p in prefixes if key.startswith(p)), None)
                if prefix is not None:
                    found[prefix][key[len(prefix) :]] = handle.get_tensor(key)
    return found


def _max_layer(keys) -> int:
    """Number of encoder layers present among tower keys (0 when none are numbered)."""
    indices = [int(m.group(1)) for k in keys if (m := LAYER_KEY.search(k))]
    return max(indices) + 1 if indices else 0


def _drop_layers_from(tensors: dict[str, torch.Tensor], keep: int) -> dict[str, torch.Tensor]:
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


def _processor_for_checkpoint(
    checkpoint: Path, candidates: list[str], tower_config, image_size: int, base_tile: bool | None = None
):
    for place in [str(checkpoint), str(checkpoint.parent), *candidates]:
        try:
            processor = transformers.AutoImageProcessor.from_pretrained(place)
        except (OSError, ValueError):
            continue
        logger.info("image processor from %s", place)
        family = _first_family(tower_config)
        return vision_image_processor(processor, family, image_size, base_tile=base_tile, where=place)
    logger.warning("%s: no image processor config found; using the encoder family's defaults.", checkpoint)
    return vision_image_processor(None, _first_family(tower_config), image_size, base_tile=bool(base_tile))


def _global_step(checkpoint: Path) -> int:
    state = checkpoint / "trainer_state.json"
    if state.exists():
        return int(json.loads(state.read_text())["global_step"])
    match = re.search(r"checkpoint-(\d+)$", checkpoint.name)
    return int(match.group(1)) if match else -1


def _export_hf(checkpoint: Path, raw: dict, out_dir: Path, loss_type: str | None, global_step: int) -> Path:
    config = transformers.AutoConfig.from_pretrained(str(checkpoint))
    found = read_tensors(checkpoint, TOWER_PREFIXES + PROJECTOR_PREFIXES)
    tower_tensors = found["model.vision_tower."] or found["vision_tower."]
    projector_state = found["model.multi_modal_projector."] or found["multi_modal_projector."]
    if not tower_tensors or not projector_state:
        raise ValueError(
            f"{checkpoint}: no vision_tower.* / multi_modal_projector.* tensors in an HF Llava checkpoint."
        )
    tower_config = config.vision_config
    select_layer = int(getattr(config, "mm_vision_select_layer", -1))
    feature_layer = config.vision_feature_layer
    if not isinstance(feature_layer, int):
        raise ValueError(
            f"{checkpoint}: vision_feature_layer={feature_layer!r}; only a single layer can be exported."
        )
    if feature_layer != -1:
        tower_config, _ = truncated_vision_config(tower_config, feature_layer)
        tower_tensors = _drop_layers_from(tower_tensors, int(tower_config.num_hidden_layers))
        select_layer = feature_layer
    tower = load_tower_from_tensors(tower_config, tower_tensors, str(checkpoint))
    metadata = encoder_metadata(
        tower.config,
        1 if config.vision_feature_select_strategy == "default" else 0,
        select_layer,
        source_checkpoint=str(checkpoint.resolve()),
        global_step=global_step,
        loss_type=loss_type or raw.get("pivot_loss_type", "unknown"),
        llm=str(raw.get("mm_language_model") or raw.get("text_config", {}).get("_name_or_path") or "unknown"),
        vision_tower=str(raw.get("mm_vision_tower") or tower_config._name_or_path or "unknown"),
        encoder_family=raw.get("pivot_encoder_family"),
        image_size=raw.get("pivot_image_size"),
        grid=raw.get("pivot_grid"),
    )
    candidates = [raw["mm_vision_tower"]] if raw.get("mm_vision_tower") else []
    anyres = config.model_type == "llava_onevision"
    processor = _processor_for_checkpoint(
        checkpoint, candidates, tower.config, metadata["image_size"], base_tile=anyres
    )
    return _write_export(
        out_dir, tower, tower.state_dict(), projector_state, processor, metadata, config.projector_hidden_act
    )


def _export_llava_next(
    checkpoint: Path,
    raw: dict,
    out_dir: Path,
    loss_type: str | None,
    global_step: int,
    vision_config: str | None,
) -> Path:
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
    present = _max_layer(tower_tensors)
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
    tower = load_tower_from_tensors(tower_config, _drop_layers_from(tower_tensors, kept), str(checkpoint))
    keep_cls = raw.get("mm_vision_select_feature", "patch") == "cls_patch"
    prefix = 0 if keep_cls else family.num_prefix_tokens(tower.config)
    if needs_wrapper(tower, family):
        if keep_cls:
            raise ValueError(
                f"{checkpoint}: mm_vision_select_feature cls_patch with a {family.name} tower read through "
                "PivotMultiTower (which drops prefix tokens) cannot be exported."
            )
        size = _image_size(tower.config)
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
    processor = _processor_for_checkpoint(
        checkpoint, [source], tower.config, metadata["image_size"], base_tile=anyres
    )
    return _write_export(out_dir, tower, tower.state_dict(), projector_state, processor, metadata, "gelu")


def export_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    loss_type: str | None = None,
    global_step: int | None = None,
    vision_config: str | None = None,
) -> Path:
    """Export a checkpoint directory (pivot/HF Llava or original LLaVA-NeXT layout; module docstring)."""
    checkpoint = Path(checkpoint)
    config_file = checkpoint / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"{checkpoint}: no config.json (not a model checkpoint directory).")
    raw = json.loads(config_file.read_text())
    step = _global_step(checkpoint) if global_step is None else global_step
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if raw.get("model_type") in HF_LLAVA_TYPES:
        return _export_hf(checkpoint, raw, out, loss_type, step)
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        return _export_llava_next(checkpoint, raw, out, loss_type, step, vision_config)
    raise ValueError(
        f"{config_file}: model_type {raw.get('model_type')!r} is neither an HF Llava checkpoint "
        f"{HF_LLAVA_TYPES} nor an original LLaVA-NeXT checkpoint (mm_vision_tower / mm_projector_type keys)."
    )


def read_export(export_dir: str | Path) -> dict:
    """`export.json` of an export directory, checked for the contract's format version."""
    path = Path(export_dir) / "export.json"
    if not path.exists():
        raise FileNotFoundError(f"{export_dir}: no export.json (not an exported encoder; see llava.export).")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}.")
    return meta


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "checkpoint", help="checkpoint directory (pivot/HF Llava or original LLaVA-NeXT layout)"
    )
    parser.add_argument("out_dir", help="directory to write vision_encoder/, projector/ and export.json into")
    parser.add_argument(
        "--loss_type", default=None, help="loss of the run (default: config pivot_loss_type, else 'unknown')"
    )
    parser.add_argument(
        "--global_step",
        type=int,
        default=None,
        help="step (default: trainer_state.json or checkpoint-N; -1 if unknown)",
    )
    parser.add_argument(
        "--vision_config",
        default=None,
        help="LLaVA-NeXT layout: original tower dir/hub id (default: mm_vision_tower)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = export_checkpoint(
        args.checkpoint,
        args.out_dir,
        loss_type=args.loss_type,
        global_step=args.global_step,
        vision_config=args.vision_config,
    )
    print(out)


if __name__ == "__main__":
    main()
