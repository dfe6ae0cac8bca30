"""Export the vision encoder (and projector) an MLLM reads as standalone checkpoints (docs/CONTRACTS.md §1).

    python -m llava.export CHECKPOINT OUT_DIR                    a trained MLLM   (console script: pivot-export)
    python -m llava.export --vision_tower NAME_OR_PATH OUT_DIR   an untrained tower, no LLM, no projector

write

    OUT_DIR/vision_encoder/   HF model directory (config.json, model.safetensors, preprocessor_config.json):
                              the tower exactly as the MLLM ran it, already truncated to the layer it read
    OUT_DIR/projector/        config.json {"projector_type": "mlp2x_gelu", "in_features", "hidden_features",
                              "out_features", "act", "bias"} + model.safetensors (linear_1.*, linear_2.*);
                              not written by the --vision_tower form
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

Three entry points share one writer (llava.export_io):
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
  2. original LLaVA-NeXT / PIVOT (`model_type` `llava_qwen`, `llava_llama`, ...): llava.export_llava_next.
  3. LoRA checkpoints (adapter_config.json, llava.train.lora): the base is loaded, the adapters merged,
     and the merged MLLM exported, so `vision_encoder/` and `projector/` are plain models.
- `export_vision_tower(vision_tower, out_dir, ...)`: the untrained ("original") encoder baseline. The
  tower (a preset name of llava.model.presets, hub id, local directory or "A+B" ensemble) is built by
  the MLLM builder's own vision path (llava.model.builder.build_vision: truncation at
  `mm_vision_select_layer`, final-norm reading, multi-tower wrapping, the processor conformed to the
  tower) with the same flags as training, so its features are those an MLLM built from it would feed
  its projector. `export.json` has `source_checkpoint`, `loss_type` and `llm` null, `global_step` -1;
  there is no `projector/`.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel
from transformers.integrations import is_deepspeed_zero3_enabled

from llava.export_io import (
    LAYER_KEY,
    VISUAL_FEATURES,
    apply_projector,
    drop_layers_from,
    encoder_metadata,
    fold_projector,
    load_tower_from_tensors,
    processor_for_checkpoint,
    write_export,
    write_projector,
)
from llava.export_llava_next import export_llava_next
from llava.model.adapters import base_llava, is_lora_checkpoint, merged_state_dict, plain_module
from llava.model.builder import (
    ASPECT_RATIOS,
    DTYPES,
    SELECT_FEATURES,
    ModelConfig,
    anyres_grid_pinpoints,
    anyres_image_processor,
    build_vision,
    load_model,
)
from llava.model.checkpoint_io import (
    FORMAT_VERSION,
    MULTI_TOWER_TYPE,
    PROJECTOR_PREFIXES,
    TOWER_PREFIXES,
    load_projector,
    read_export,
    read_tensors,
)
from llava.model.encoders import truncated_vision_config

__all__ = [
    "FORMAT_VERSION",
    "HF_LLAVA_TYPES",
    "LAYER_KEY",
    "MULTI_TOWER_TYPE",
    "PROJECTOR_PREFIXES",
    "SOURCE_EXPORT_DIR",
    "TOWER_PREFIXES",
    "VISUAL_FEATURES",
    "apply_projector",
    "cpu_state_dict",
    "encoder_metadata",
    "export_checkpoint",
    "export_model",
    "export_vision_tower",
    "fold_projector",
    "gathered_parameters",
    "load_projector",
    "load_tower_from_tensors",
    "main",
    "read_export",
    "read_tensors",
    "resolve_source",
    "write_projector",
]

logger = logging.getLogger(__name__)

HF_LLAVA_TYPES = ("llava", "llava_onevision")
SOURCE_EXPORT_DIR = "stage3_source_export"
NO_LLM = "(none: tower-only export)"  # ModelConfig.llm placeholder; build_vision never reads it


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
    """A CPU copy of the module's full state dict on the main process (None elsewhere); LoRA adapters in it
    are merged, under the plain module's names (llava.model.adapters `merged_state_dict`)."""
    with gathered_parameters(module):
        if not is_main_process:
            return None
        return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in merged_state_dict(module).items()}


# ---- MLLMs in memory ---------------------------------------------------------------------------
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
    """Export an in-memory MLLM; every process must call it under ZeRO-3, only the main one writes.

    A model with LoRA adapters (llava.train.lora) is exported merged, and is left as it is."""
    model = base_llava(model)
    config = model.config
    if config.vision_feature_layer != -1:
        raise ValueError(
            f"vision_feature_layer={config.vision_feature_layer}: export_model expects the tower truncated to the "
            "layer it feeds (pivot models); use export_checkpoint for other checkpoints."
        )
    tower = plain_module(model.model.vision_tower)
    tower_state = cpu_state_dict(model.model.vision_tower, is_main_process)
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
    return write_export(
        Path(out_dir),
        tower,
        tower_state,
        projector_state,
        image_processor,
        metadata,
        config.projector_hidden_act,
    )


# ---- checkpoints on disk --------------------------------------------------------------------------
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
        tower_tensors = drop_layers_from(tower_tensors, int(tower_config.num_hidden_layers))
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
    processor = processor_for_checkpoint(
        checkpoint, candidates, tower.config, metadata["image_size"], base_tile=anyres
    )
    return write_export(
        out_dir, tower, tower.state_dict(), projector_state, processor, metadata, config.projector_hidden_act
    )


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
    if is_lora_checkpoint(checkpoint):  # adapters merged into their base, then exported as an in-memory MLLM
        model, _, image_processor = load_model(checkpoint)
        return export_model(
            model,
            image_processor,
            out,
            source_checkpoint=checkpoint,
            global_step=step,
            loss_type=loss_type or raw.get("pivot_loss_type", "unknown"),
        )
    if raw.get("model_type") in HF_LLAVA_TYPES:
        return _export_hf(checkpoint, raw, out, loss_type, step)
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        return export_llava_next(checkpoint, raw, out, loss_type, step, vision_config)
    raise ValueError(
        f"{config_file}: model_type {raw.get('model_type')!r} is neither an HF Llava checkpoint "
        f"{HF_LLAVA_TYPES} nor an original LLaVA-NeXT checkpoint (mm_vision_tower / mm_projector_type keys)."
    )


# ---- Stage-3 sources -----------------------------------------------------------------------------
def resolve_source(source: str | Path, work_dir: str | Path) -> Path:
    """The export directory of a Stage-3 source (llava.model.stage3): itself if it is an export, else an
    export of the checkpoint written to `work_dir/stage3_source_export`."""
    path = Path(source)
    if (path / "export.json").exists():
        return path
    if (path / "config.json").exists():
        target = Path(work_dir) / SOURCE_EXPORT_DIR
        logger.info("exporting the encoder of %s to %s", path, target)
        return export_checkpoint(path, target)
    raise FileNotFoundError(
        f"Stage-3 source {source}: neither an exported encoder (export.json) nor a checkpoint (config.json)."
    )


# ---- untrained towers (the original-encoder baseline) ----------------------------------------------
def export_vision_tower(
    vision_tower: str,
    out_dir: str | Path,
    *,
    mm_vision_select_layer: int | None = None,
    mm_vision_select_feature: str = "patch",
    image_aspect_ratio: str = "square",
    ensemble_grid: int | None = None,
    dtype: str = "float32",
) -> Path:
    """Export an untrained tower exactly as `build_model` would build it for an MLLM, without LLM or projector.

    `vision_tower` and the flags mean what they mean in `llava.model.builder.ModelConfig` (give the values the
    trained runs used; the defaults are the builder's). The tower, its feature point and its image processor
    come from `build_vision`, the builder's own code; `export.json` records `loss_type`, `llm` and
    `source_checkpoint` as null and `global_step` -1, and no `projector/` is written.
    """
    cfg = ModelConfig(
        llm=NO_LLM,
        vision_tower=vision_tower,
        mm_vision_select_layer=mm_vision_select_layer,
        mm_vision_select_feature=mm_vision_select_feature,
        image_aspect_ratio=image_aspect_ratio,
        ensemble_grid=ensemble_grid,
        dtype=dtype,
    )
    vision = build_vision(cfg, DTYPES[cfg.dtype])
    processor = vision.image_processor
    if cfg.image_aspect_ratio != "square":  # build_model's anyres processor; the export keeps its base tile
        processor = anyres_image_processor(
            processor, vision.image_size, anyres_grid_pinpoints(vision.image_size)
        )
    metadata = encoder_metadata(
        vision.tower.config,
        vision.num_prefix_tokens,
        vision.select_layer,
        source_checkpoint=None,
        global_step=-1,
        loss_type=None,
        llm=None,
        vision_tower=vision_tower,
        encoder_family=vision.family.name if vision.family else "multi_tower",
        image_size=vision.image_size,
        grid=vision.grid,
    )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return write_export(out, vision.tower, vision.tower.state_dict(), None, processor, metadata)


# ---- command line ----------------------------------------------------------------------------------
USAGE = """python -m llava.export CHECKPOINT OUT_DIR [--loss_type L] [--global_step N] [--vision_config DIR]
       python -m llava.export --vision_tower NAME_OR_PATH OUT_DIR [--mm_vision_select_layer N]
                              [--mm_vision_select_feature F] [--image_aspect_ratio R] [--ensemble_grid G] [--dtype D]"""
CHECKPOINT_FLAGS = ("loss_type", "global_step", "vision_config")
TOWER_FLAGS = (
    "mm_vision_select_layer",
    "mm_vision_select_feature",
    "image_aspect_ratio",
    "ensemble_grid",
    "dtype",
)


def build_parser() -> argparse.ArgumentParser:
    """The two mutually exclusive forms: CHECKPOINT OUT_DIR, or --vision_tower NAME_OR_PATH OUT_DIR."""
    parser = argparse.ArgumentParser(
        prog="python -m llava.export",
        usage=USAGE,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "paths",
        nargs="+",
        metavar="[CHECKPOINT] OUT_DIR",
        help="CHECKPOINT (pivot/HF Llava or original LLaVA-NeXT layout) and OUT_DIR, or OUT_DIR alone with "
        "--vision_tower; OUT_DIR receives vision_encoder/, projector/ (checkpoints only) and export.json",
    )
    checkpoint = parser.add_argument_group("CHECKPOINT OUT_DIR form")
    checkpoint.add_argument(
        "--loss_type", default=None, help="loss of the run (default: config pivot_loss_type, else 'unknown')"
    )
    checkpoint.add_argument(
        "--global_step",
        type=int,
        default=None,
        help="step (default: trainer_state.json or checkpoint-N; -1 if unknown)",
    )
    checkpoint.add_argument(
        "--vision_config",
        default=None,
        help="LLaVA-NeXT layout: original tower dir/hub id (default: mm_vision_tower)",
    )
    tower = parser.add_argument_group(
        "--vision_tower NAME_OR_PATH OUT_DIR form (untrained tower, no projector)"
    )
    tower.add_argument(
        "--vision_tower",
        default=None,
        help="vision preset (llava.model.presets, e.g. siglip2-so16), hub id, local dir or 'A+B' ensemble, "
        "exported as build_model would build it for an MLLM",
    )
    tower.add_argument(
        "--mm_vision_select_layer",
        type=int,
        default=None,
        help="hidden state the projector would read (default: the family's, -2 for SigLIP/CLIP); as in training",
    )
    tower.add_argument(
        "--mm_vision_select_feature",
        choices=SELECT_FEATURES,
        default=None,
        help="'patch' (default) drops prefix tokens; 'cls_patch' keeps a single CLS token; as in training",
    )
    tower.add_argument(
        "--image_aspect_ratio",
        choices=ASPECT_RATIOS,
        default=None,
        help="'square' (default) or 'anyres_max_9' (exports the base-tile processor); as in training",
    )
    tower.add_argument(
        "--ensemble_grid",
        type=int,
        default=None,
        help="common tokens per side of an ensemble; as in training",
    )
    tower.add_argument(
        "--dtype", choices=tuple(DTYPES), default=None, help="weights dtype of the export (default float32)"
    )
    return parser


def _check_form(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exit with an argparse error unless exactly one of the two forms was given, with its own flags only."""

    def given(names: tuple[str, ...]) -> list[str]:
        return [f"--{name}" for name in names if getattr(args, name) is not None]

    if args.vision_tower is not None:
        if len(args.paths) != 1 or given(CHECKPOINT_FLAGS):
            extra = given(CHECKPOINT_FLAGS)
            parser.error(
                "--vision_tower exports an untrained tower and takes OUT_DIR only: it excludes a CHECKPOINT "
                f"and {', '.join(f'--{n}' for n in CHECKPOINT_FLAGS)} (got paths {args.paths}"
                + (f" and {', '.join(extra)}" if extra else "")
                + ")."
            )
    elif len(args.paths) != 2 or given(TOWER_FLAGS):
        extra = given(TOWER_FLAGS)
        parser.error(
            "give CHECKPOINT OUT_DIR, or --vision_tower NAME_OR_PATH OUT_DIR"
            + (f"; {', '.join(extra)} only apply with --vision_tower" if extra else "")
            + f" (got paths {args.paths})."
        )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_form(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.vision_tower is not None:
        tower_flags = {n: getattr(args, n) for n in TOWER_FLAGS if getattr(args, n) is not None}
        out = export_vision_tower(args.vision_tower, args.paths[0], **tower_flags)
    else:
        out = export_checkpoint(
            args.paths[0],
            args.paths[1],
            loss_type=args.loss_type,
            global_step=args.global_step,
            vision_config=args.vision_config,
        )
    print(out)


if __name__ == "__main__":
    main()
