"""Build and load the LLaVA-OneVision-style MLLM on transformers' own classes.

vision tower (llava.model.encoders, truncated to `mm_vision_select_layer`) → `mlp2x_gelu` projector
(HF `LlavaMultiModalProjector`: Linear → GELU → Linear) → Qwen2.5 (or any HF causal LM).

- `image_aspect_ratio="square"` (the paper's runs): `LlavaForConditionalGeneration`, one image →
  `grid x grid` tokens (+1 with `mm_vision_select_feature="cls_patch"`), flat merge.
- `image_aspect_ratio="anyres_max_9"` (upstream OneVision default): `LlavaOnevisionForConditionalGeneration`
  with grid pinpoints (1x1)…(6x6) × the tower resolution and the learned `image_newline`.

Checkpoints are plain HF checkpoints (`save_pretrained`, safetensors) that load with transformers
alone; our extra knobs are stored as `mm_*` / `pivot_*` keys in config.json (LLaVA-NeXT names).
Pretrained weights are loaded once, directly into the final modules (no random init at full size).
The tokenizer gets the `qwen_1_5` training format as its chat template (llava.model.chat_template).
The image processor outputs the tower config's `image_size` (encoders.conform_image_processor). A
`pivot_multi_tower` directory (an exported ensemble or wrapped tower) can serve as the vision tower,
already read at its feature point (Stage 3 transplants).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from llava.model.chat_template import set_training_chat_template
from llava.model.encoders import (
    ENCODER_FAMILIES,
    EncoderFamily,
    conform_image_processor,
    image_processor_for,
    load_vision_tower,
)
from llava.model.multi_tower import PivotMultiTower, PivotMultiTowerConfig, needs_wrapper
from llava.model.parts import freeze_unused_vision_parts
from llava.model.presets import ensemble_preprocessing, resolve_llm, split_ensemble

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
PROJECTOR_TYPES = ("mlp2x_gelu",)
ASPECT_RATIOS = ("square", "anyres_max_9")
SELECT_FEATURES = ("patch", "cls_patch")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelConfig:
    """What to build: LLaVA-NeXT's model arguments, with help text on every field."""

    llm: str
    """LLM preset (qwen2.5-0.5b…7b), hub id or local directory."""
    vision_tower: str
    """Vision preset, hub id or directory; "A+B" builds a channel-concatenated ensemble."""
    mm_vision_select_layer: int | None = None
    """Hidden state of the full tower fed to the projector (None: family default, -2 for SigLIP/CLIP)."""
    mm_vision_select_feature: str = "patch"
    """"patch" drops prefix tokens (CLS/registers); "cls_patch" keeps a single CLS token."""
    mm_projector_type: str = "mlp2x_gelu"
    """Projector architecture; HF Llava checkpoints fix the 2-layer GELU MLP."""
    image_aspect_ratio: str = "square"
    """"square" (LlavaForConditionalGeneration) or "anyres_max_9" (LlavaOnevisionForConditionalGeneration)."""
    ensemble_grid: int | None = None
    """Common tokens-per-side for ensembles (default: the first tower's grid)."""
    dtype: str = "float32"
    """Weights dtype: float32 (CPU), bfloat16 (GPU)."""
    attn_implementation: str | None = None
    """LLM attention kernel: None picks `default_attn_implementation(dtype)` (flash_attention_2 on GPU, else sdpa)."""
    from_config_only: bool = False
    """Random weights from the configs (throughput runs at real sizes without downloading weights)."""

    def __post_init__(self) -> None:
        if self.mm_projector_type not in PROJECTOR_TYPES:
            raise ValueError(
                f"mm_projector_type={self.mm_projector_type!r}: only {PROJECTOR_TYPES} map onto HF Llava's projector."
            )
        if self.image_aspect_ratio not in ASPECT_RATIOS:
            raise ValueError(
                f"image_aspect_ratio={self.image_aspect_ratio!r}; choose one of {ASPECT_RATIOS}."
            )
        if self.mm_vision_select_feature not in SELECT_FEATURES:
            raise ValueError(
                f"mm_vision_select_feature={self.mm_vision_select_feature!r}; choose {SELECT_FEATURES}."
            )
        if self.mm_vision_select_feature == "cls_patch" and self.image_aspect_ratio != "square":
            raise ValueError(
                f"mm_vision_select_feature='cls_patch' works with image_aspect_ratio='square' only: "
                f"{self.image_aspect_ratio} reassembles tiles into a patch grid (LLaVA-OneVision's "
                "pack_image_features), which has no place for a CLS token. Use 'patch'."
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}; choose one of {tuple(DTYPES)}.")


@dataclass
class VisionSetup:
    """The tower as the MLLM reads it."""

    tower: PreTrainedModel
    family: EncoderFamily | None  # None for multi-tower wrappers
    select_layer: int
    image_size: int
    grid: int
    num_prefix_tokens: int  # prefix tokens the HF Llava select strategy must drop (0 or 1)
    image_processor: object
    tokens_per_image: int  # square images: grid² (+1 for a kept CLS token)


def default_attn_implementation(dtype: str | torch.dtype = "bfloat16") -> str:
    """The LLM attention kernel used when none is named: "flash_attention_2" when CUDA is available,
    `flash_attn` imports and the weights are 16-bit (the kernel has no fp32 path), else "sdpa"."""
    half = DTYPES.get(dtype, dtype) in (torch.bfloat16, torch.float16)
    if half and torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def build_vision(cfg: ModelConfig, dtype: torch.dtype) -> VisionSetup:
    """Load the tower(s) and decide how HF Llava reads them (see llava.model.multi_tower)."""
    members = split_ensemble(cfg.vision_tower)
    if len(members) == 1 and _is_multi_tower(members[0]):
        return _load_multi_tower(members[0], cfg, dtype)
    loaded = []
    for path in members:
        tower, family, select_layer = load_vision_tower(
            path, cfg.mm_vision_select_layer, dtype, cfg.from_config_only
        )
        size = _tower_image_size(tower, family)
        loaded.append((tower, family, select_layer, size, family.grid_size(tower.config, size), path))
    tower, family, select_layer, size, grid, path = loaded[0]
    processor = _load_image_processor(path, ensemble_preprocessing(cfg.vision_tower)[0] or family, size)
    prefix = family.num_prefix_tokens(tower.config)
    wrapped = len(loaded) > 1 or needs_wrapper(tower, family)
    if cfg.mm_vision_select_feature == "cls_patch":
        if wrapped or prefix != 1:
            how = (
                "read through the multi-tower wrapper, which drops prefix tokens"
                if wrapped
                else "read directly"
            )
            raise ValueError(
                f"mm_vision_select_feature='cls_patch' needs a single tower with exactly one CLS token that HF "
                f"Llava reads directly; {cfg.vision_tower} is a {family.name} tower with {prefix} prefix "
                f"token(s), {how} (ensembles, DINOv2 with registers or after its final norm, ConvNeXt). "
                "Use 'patch' (for DINOv2 without registers, a non-last mm_vision_select_layer also works)."
            )
        return VisionSetup(tower, family, select_layer, size, grid, 0, processor, grid**2 + 1)
    if not wrapped:
        return VisionSetup(tower, family, select_layer, size, grid, prefix, processor, grid**2)
    wrapper = PivotMultiTower.from_members(
        [(t, f.name, s, g) for t, f, _, s, g, _ in loaded], grid=cfg.ensemble_grid or grid
    )
    common = wrapper.config.grid
    return VisionSetup(wrapper, None, select_layer, size, common, 0, processor, common**2)


def _is_multi_tower(path: str) -> bool:
    return transformers.AutoConfig.from_pretrained(path).model_type == PivotMultiTowerConfig.model_type


def _load_multi_tower(path: str, cfg: ModelConfig, dtype: torch.dtype) -> VisionSetup:
    """A saved `PivotMultiTower` (an exported ensemble or wrapped tower), read as it was exported."""
    if cfg.mm_vision_select_layer not in (None, -1) or cfg.mm_vision_select_feature != "patch":
        raise ValueError(
            f"{path} is a multi-tower encoder already read at its feature point: use mm_vision_select_layer "
            f"-1 and mm_vision_select_feature 'patch' (got {cfg.mm_vision_select_layer}, "
            f"{cfg.mm_vision_select_feature!r})."
        )
    if cfg.from_config_only:
        tower = PivotMultiTower(PivotMultiTowerConfig.from_pretrained(path)).to(dtype)
    else:
        tower = PivotMultiTower.from_pretrained(path, dtype=dtype)
    size, grid = int(tower.config.image_size), int(tower.config.grid)
    first = ENCODER_FAMILIES[tower.config.towers[0]["family"]]
    processor = _load_image_processor(path, first, size)
    return VisionSetup(tower, None, -1, size, grid, 0, processor, grid**2)


def _tower_image_size(tower: PreTrainedModel, family: EncoderFamily) -> int:
    size = getattr(tower.config, "image_size", family.image_size)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _load_image_processor(path: str, family: EncoderFamily, image_size: int):
    """The checkpoint's image processor made to agree with the tower (`conform_image_processor`), or the
    family's defaults (`family` may be a preset's own preprocessing, e.g. MoCo-v3) when it has none."""
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(path)
    except OSError:
        logger.info("No image processor config at %s; using the %s defaults.", path, family.name)
        return image_processor_for(family, image_size)
    return conform_image_processor(processor, family, image_size, path)


def ensure_image_token(tokenizer: PreTrainedTokenizerBase) -> int:
    """Add `<image>` as a special token when the tokenizer lacks it (Qwen2.5 does); return its id."""
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)


def anyres_grid_pinpoints(image_size: int, max_side: int = 6) -> list[list[int]]:
    """LLaVA-OneVision's `(1x1),...,(6x6)` pinpoints in pixels."""
    return [[i * image_size, j * image_size] for i in range(1, max_side + 1) for j in range(1, max_side + 1)]


def build_model(cfg: ModelConfig) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, object]:
    """Build the MLLM from an LLM and a vision tower; returns (model, tokenizer, image_processor)."""
    dtype = DTYPES[cfg.dtype]
    attn_implementation = cfg.attn_implementation or default_attn_implementation(cfg.dtype)
    llm_path = resolve_llm(cfg.llm)
    tokenizer = set_training_chat_template(AutoTokenizer.from_pretrained(llm_path))
    image_token_id = ensure_image_token(tokenizer)
    if cfg.from_config_only:
        llm = AutoModelForCausalLM.from_config(
            transformers.AutoConfig.from_pretrained(llm_path),
            dtype=dtype,
            attn_implementation=attn_implementation,
        )
    else:
        llm = AutoModelForCausalLM.from_pretrained(
            llm_path, dtype=dtype, attn_implementation=attn_implementation
        )
    if image_token_id >= llm.get_input_embeddings().num_embeddings:
        # On the meta device (`build_model_view`) there are no embeddings to average over.
        llm.resize_token_embeddings(len(tokenizer), mean_resizing=llm.device.type != "meta")
    vision = build_vision(cfg, dtype)
    anyres = cfg.image_aspect_ratio != "square"
    common = {
        "vision_config": vision.tower.config,
        "text_config": llm.config,
        "image_token_id": image_token_id,
        "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "default" if vision.num_prefix_tokens == 1 else "full",
        "vision_feature_layer": -1,
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(getattr(llm.config, "tie_word_embeddings", False)),
    }
    if anyres:
        config = transformers.LlavaOnevisionConfig(
            **common,
            image_grid_pinpoints=anyres_grid_pinpoints(vision.image_size),
            vision_aspect_ratio=cfg.image_aspect_ratio,
        )
        model_class = transformers.LlavaOnevisionForConditionalGeneration
    else:
        config = transformers.LlavaConfig(**common, image_seq_length=vision.tokens_per_image)
        model_class = transformers.LlavaForConditionalGeneration
    _record_knobs(config, cfg, vision, llm_path)
    image_processor = (
        anyres_image_processor(vision.image_processor, vision.image_size, config.image_grid_pinpoints)
        if anyres
        else vision.image_processor
    )
    with torch.device("meta"):
        model = model_class(config)
    model.model.vision_tower = vision.tower
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    projector_class = type(model.model.multi_modal_projector)
    model.model.multi_modal_projector = projector_class(config).to(dtype)
    if anyres:
        hidden = config.text_config.hidden_size
        newline = torch.randn(hidden, dtype=dtype) * hidden**-0.5
        model.model.image_newline = torch.nn.Parameter(newline)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.language_model.get_input_embeddings().weight
    model.config.use_cache = False
    return model, tokenizer, image_processor


def anyres_image_processor(base, image_size: int, grid_pinpoints: list[list[int]]):
    """OneVision's anyres image processor with the tower's resolution and normalisation (PIL backend)."""
    return transformers.LlavaOnevisionImageProcessor(
        size={"height": image_size, "width": image_size},
        image_mean=list(base.image_mean),
        image_std=list(base.image_std),
        resample=getattr(base, "resample", 3),
        image_grid_pinpoints=grid_pinpoints,
        do_pad=True,
    )


def _record_knobs(config, cfg: ModelConfig, vision: VisionSetup, llm_path: str) -> None:
    config.mm_vision_tower = cfg.vision_tower
    config.mm_language_model = llm_path
    config.mm_vision_select_layer = vision.select_layer
    config.mm_vision_select_feature = cfg.mm_vision_select_feature
    config.mm_projector_type = cfg.mm_projector_type
    config.image_aspect_ratio = cfg.image_aspect_ratio
    config.pivot_encoder_family = vision.family.name if vision.family else "multi_tower"
    config.pivot_image_size = vision.image_size
    config.pivot_grid = vision.grid
    config.pivot_num_prefix_tokens = vision.num_prefix_tokens


def build_model_view(cfg: ModelConfig) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, object]:
    """What `build_model(cfg)` gives besides weights: (config, tokenizer, image_processor), from configs
    alone. The model is built from its configs on the meta device, so no weight is read or allocated, and
    the config (image-token count, anyres grid) is the builder's own."""
    with torch.device("meta"):
        model, tokenizer, image_processor = build_model(replace(cfg, from_config_only=True))
    return model.config, tokenizer, image_processor


def load_model_view(path: str | Path) -> tuple[PretrainedConfig, PreTrainedTokenizerBase, object]:
    """What `load_model(path)` gives besides weights: (config, tokenizer, image_processor) read from the
    checkpoint's files (a LoRA checkpoint's from its base, as `load_model` merges it into that base)."""
    if (Path(path) / "adapter_config.json").is_file():
        from llava.model.adapters import adapter_base

        path = adapter_base(path)
    path = str(path)
    config = transformers.AutoConfig.from_pretrained(path)
    tokenizer = set_training_chat_template(AutoTokenizer.from_pretrained(path))
    return config, tokenizer, transformers.AutoImageProcessor.from_pretrained(path)


def load_model(
    path: str | Path, dtype: str = "float32", attn_implementation: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, object]:
    """Load a checkpoint written by `save_model`; returns (model, tokenizer, image_processor).

    `attn_implementation=None` gives the LLM `default_attn_implementation(dtype)` and leaves the tower's default.
    A LoRA checkpoint (adapter_config.json) comes back merged into its base (llava.model.adapters).
    """
    if (Path(path) / "adapter_config.json").is_file():
        from llava.model.adapters import load_lora_checkpoint

        return load_lora_checkpoint(path, dtype, attn_implementation)
    path = str(path)
    config = transformers.AutoConfig.from_pretrained(path)
    if getattr(config, "pivot_projector_reuse_layers", None) is not None:
        from llava.model.stage3 import load_stage3_model  # Stage-3 projector (llava.model.stage3)

        return load_stage3_model(
            path, dtype, attn_implementation or {"text_config": default_attn_implementation(dtype)}
        )
    model_class = (
        transformers.LlavaOnevisionForConditionalGeneration
        if config.model_type == "llava_onevision"
        else transformers.LlavaForConditionalGeneration
    )
    attn = attn_implementation or {"text_config": default_attn_implementation(dtype)}
    model = model_class.from_pretrained(path, dtype=DTYPES[dtype], attn_implementation=attn)
    freeze_unused_vision_parts(model)
    model.config.use_cache = False
    tokenizer = set_training_chat_template(AutoTokenizer.from_pretrained(path))
    image_processor = transformers.AutoImageProcessor.from_pretrained(path)
    return model, tokenizer, image_processor


def save_model(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, image_processor, out_dir: str | Path
) -> None:
    """Write a plain HF checkpoint (safetensors) with its tokenizer (qwen_1_5 chat template) and image processor."""
    model.save_pretrained(str(out_dir), safe_serialization=True)
    set_training_chat_template(tokenizer).save_pretrained(str(out_dir))
    image_processor.save_pretrained(str(out_dir))
