"""Vision-encoder registry: one entry per encoder family, one uniform way to build a tower.

Each `EncoderFamily` says which transformers class loads the tower, its input resolution and
normalisation, how images are resized/cropped, which hidden layer feeds the projector by default
(LLaVA-NeXT's `mm_vision_select_layer`), how many prefix tokens (CLS, registers) to drop, and which
modules are not on the feature path. Adding an encoder family is one entry in `ENCODER_FAMILIES`.

Conventions (DESIGN §2, LLaVA-OneVision):
- The tower is built truncated to the layer actually used: with `select_layer = -2` on a 27-layer
  SigLIP, the tower keeps 26 layers and the projector reads `hidden_states[-1]` of the truncated tower
  (the state *before* any final norm, as upstream LLaVA does). Modules after that point (post-norms,
  pooling heads) stay in the checkpoint, so plain transformers loads it, but are frozen: every
  trainable parameter receives a gradient.
- MAE towers load as `ViTModel` (the state dicts are key-for-key identical), so they run unmasked and
  unshuffled by construction; HF `ViTMAEModel` shuffles tokens even at mask_ratio 0. MAE's fixed
  sin-cos position embeddings stay frozen.
- Towers whose prefix is more than one token (DINOv2 with registers), convolutional towers (ConvNeXt)
  and multi-tower ensembles go through `llava.model.multi_tower.PivotMultiTower`, because HF Llava can
  only drop zero or one prefix token.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import transformers
from transformers import PretrainedConfig, PreTrainedModel

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)


def _no_prefix(config: PretrainedConfig) -> int:
    return 0


def _cls_only(config: PretrainedConfig) -> int:
    return 1


def _cls_and_registers(config: PretrainedConfig) -> int:
    return 1 + int(getattr(config, "num_register_tokens", 0))


@dataclass(frozen=True)
class EncoderFamily:
    """How to build, feed and read one family of vision encoders."""

    name: str
    model_types: tuple[str, ...]  # HF `model_type` values that belong to this family
    model_class: str  # transformers class that loads the vision tower
    image_size: int  # default input resolution (square)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resample: str  # "bicubic" | "bilinear"
    center_crop: bool  # shortest-side resize then centre crop (True) or direct square resize (False)
    processor_class: str  # transformers image processor (PIL backend is used without torchvision)
    default_select_layer: int = -2
    output: str = "tokens"  # "tokens" [B, N, C] or "feature_map" [B, C, H, W]
    prefix_tokens: Callable[[PretrainedConfig], int] = _no_prefix
    unused_modules: tuple[str, ...] = ()  # submodules not on the feature path (frozen)
    frozen_parameters: tuple[str, ...] = ()  # parameters fixed by design
    config_overrides: dict = field(default_factory=dict)  # applied when loading a tower
    vision_config_attr: str | None = None  # attribute holding the vision config in a full config

    def num_prefix_tokens(self, config: PretrainedConfig) -> int:
        return self.prefix_tokens(config)

    def grid_size(self, config: PretrainedConfig, image_size: int | None = None) -> int:
        """Patches per side of the feature grid for a square input."""
        size = image_size or _config_image_size(config, self.image_size)
        if self.output == "feature_map":
            return size // 32  # ConvNeXt: stride 4 stem then three 2x downsamplings
        return size // int(config.patch_size)

    def tokens_per_image(self, config: PretrainedConfig, image_size: int | None = None) -> int:
        return self.grid_size(config, image_size) ** 2

    def depth(self, config: PretrainedConfig) -> int:
        if self.output == "feature_map":
            return len(config.depths)
        return int(config.num_hidden_layers)


def _config_image_size(config: PretrainedConfig, default: int) -> int:
    size = getattr(config, "image_size", default)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


ENCODER_FAMILIES: dict[str, EncoderFamily] = {
    "siglip": EncoderFamily(
        name="siglip",
        model_types=("siglip", "siglip_vision_model"),
        model_class="SiglipVisionModel",
        image_size=384,
        mean=HALF,
        std=HALF,
        resample="bicubic",
        center_crop=False,
        processor_class="SiglipImageProcessor",
        unused_modules=("post_layernorm", "head"),
        config_overrides={"vision_use_head": False},
        vision_config_attr="vision_config",
    ),
    "clip": EncoderFamily(
        name="clip",
        model_types=("clip", "clip_vision_model"),
        model_class="CLIPVisionModel",
        image_size=336,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        resample="bicubic",
        center_crop=True,
        processor_class="CLIPImageProcessor",
        prefix_tokens=_cls_only,
        unused_modules=("post_layernorm",),
        vision_config_attr="vision_config",
    ),
    "dinov2": EncoderFamily(
        name="dinov2",
        model_types=("dinov2",),
        model_class="Dinov2Model",
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resample="bicubic",
        center_crop=True,
        processor_class="BitImageProcessor",
        default_select_layer=-1,
        prefix_tokens=_cls_only,
        unused_modules=("layernorm", "embeddings.mask_token"),
    ),
    "dinov2_reg": EncoderFamily(
        name="dinov2_reg",
        model_types=("dinov2_with_registers",),
        model_class="Dinov2WithRegistersModel",
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resample="bicubic",
        center_crop=True,
        processor_class="BitImageProcessor",
        default_select_layer=-1,
        prefix_tokens=_cls_and_registers,
        unused_modules=("layernorm", "embeddings.mask_token"),
    ),
    "mae": EncoderFamily(
        name="mae",
        model_types=("vit_mae",),
        model_class="ViTModel",  # loaded unshuffled as a plain ViT (identical state-dict keys)
        image_size=224,
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        resample="bicubic",
        center_crop=False,
        processor_class="ViTImageProcessor",
        default_select_layer=-1,
        prefix_tokens=_cls_only,
        unused_modules=("layernorm", "pooler"),
        frozen_parameters=("embeddings.position_embeddings",),
    ),
    "vit": EncoderFamily(
        # Supervised ViT (google/vit-*-in21k, trained on inputs scaled to [-1, 1], hence mean/std 0.5)
        # and MoCo-v3 converted to the HF ViT layout (its preset sets ImageNet mean/std).
        name="vit",
        model_types=("vit",),
        model_class="ViTModel",
        image_size=224,
        mean=HALF,
        std=HALF,
        resample="bilinear",
        center_crop=False,
        processor_class="ViTImageProcessor",
        default_select_layer=-1,
        prefix_tokens=_cls_only,
        unused_modules=("layernorm", "pooler"),
    ),
    "convnext": EncoderFamily(
        name="convnext",
        model_types=("convnext",),
        model_class="ConvNextModel",
        image_size=256,
        mean=OPENAI_CLIP_MEAN,
        std=OPENAI_CLIP_STD,
        resample="bicubic",
        center_crop=False,
        processor_class="ConvNextImageProcessor",
        default_select_layer=-1,
        output="feature_map",
        unused_modules=("layernorm", "pooler"),
    ),
}

_FAMILY_BY_MODEL_TYPE = {mt: fam for fam in ENCODER_FAMILIES.values() for mt in fam.model_types}


def family_for_config(config: PretrainedConfig) -> EncoderFamily:
    """The registry entry for an HF config (full CLIP/SigLIP configs and vision-only configs alike)."""
    model_type = getattr(config, "model_type", None)
    family = _FAMILY_BY_MODEL_TYPE.get(model_type)
    if family is None:
        known = ", ".join(sorted(_FAMILY_BY_MODEL_TYPE))
        raise ValueError(
            f"No encoder family for model_type {model_type!r}. Known model types: {known}. "
            "Add an EncoderFamily entry to llava.model.encoders.ENCODER_FAMILIES."
        )
    return family


def vision_config_of(config: PretrainedConfig) -> PretrainedConfig:
    """The vision part of a config (SiglipConfig/CLIPConfig hold it under `vision_config`)."""
    family = family_for_config(config)
    if family.vision_config_attr and hasattr(config, family.vision_config_attr):
        return getattr(config, family.vision_config_attr)
    return config


def resolve_select_layer(select_layer: int, depth: int) -> int:
    """Number of transformer layers needed so that the last one is `hidden_states[select_layer]`.

    `hidden_states` has depth + 1 entries (embeddings output first), so index -2 of a 27-layer
    tower is the output of layer 26 and index 0 is the embeddings output (0 layers).
    """
    index = select_layer if select_layer >= 0 else depth + 1 + select_layer
    if not 1 <= index <= depth:
        raise ValueError(
            f"mm_vision_select_layer={select_layer} selects hidden state {index} of a {depth}-layer tower; "
            f"choose a layer output in 1..{depth} (or -{depth}..-1)."
        )
    return index


def truncated_vision_config(
    config: PretrainedConfig, select_layer: int
) -> tuple[PretrainedConfig, EncoderFamily]:
    """Vision config truncated to the selected layer, with the family's overrides applied."""
    family = family_for_config(config)
    vision_config = vision_config_of(config)
    if family.name == "mae":
        vision_config = _mae_to_vit_config(vision_config)
    settings = {**vision_config.to_dict(), **family.config_overrides}
    if family.output == "tokens":
        settings["num_hidden_layers"] = resolve_select_layer(select_layer, family.depth(vision_config))
        for key in (
            "out_features",
            "out_indices",
            "stage_names",
        ):  # backbone stage lists (DINOv2) follow depth
            settings.pop(key, None)
    elif select_layer != -1:
        raise ValueError(f"{family.name} towers only support mm_vision_select_layer=-1 (the last stage).")
    return vision_config.__class__.from_dict(settings), family


def _mae_to_vit_config(config: PretrainedConfig) -> PretrainedConfig:
    keys = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "hidden_act",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "initializer_range",
        "layer_norm_eps",
        "image_size",
        "patch_size",
        "num_channels",
        "qkv_bias",
    )
    return transformers.ViTConfig(**{k: getattr(config, k) for k in keys if hasattr(config, k)})


def load_vision_tower(
    name_or_path: str,
    select_layer: int | None = None,
    dtype: torch.dtype = torch.float32,
    from_config_only: bool = False,
) -> tuple[PreTrainedModel, EncoderFamily, int]:
    """Load a vision tower truncated to `select_layer` from a hub id or local directory.

    Returns (tower, family, select_layer used). `from_config_only` builds random weights from the
    checkpoint's config (for throughput runs at real sizes without downloading weights).
    """
    config = transformers.AutoConfig.from_pretrained(name_or_path)
    family = family_for_config(config)
    select_layer = family.default_select_layer if select_layer is None else select_layer
    vision_config, family = truncated_vision_config(config, select_layer)
    model_class = getattr(transformers, family.model_class)
    if from_config_only:
        tower = model_class(vision_config).to(dtype)
    else:
        # Truncation leaves the dropped layers (and SigLIP's head) unused: silence that load report.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            tower = model_class.from_pretrained(name_or_path, config=vision_config, dtype=dtype)
        finally:
            transformers.logging.set_verbosity(verbosity)
    if family.output == "tokens":
        logger.info(
            "%s: %s tower truncated to %d of %d layers (mm_vision_select_layer=%d)",
            name_or_path,
            family.name,
            vision_config.num_hidden_layers,
            family.depth(vision_config_of(config)),
            select_layer,
        )
    prepare_tower(tower, family)
    return tower, family, select_layer


def prepare_tower(tower: PreTrainedModel, family: EncoderFamily) -> None:
    """Freeze what is not on the feature path or fixed by design (see module docstring)."""
    for name in family.unused_modules:
        module_name, _, attr = name.rpartition(".")
        owner = tower.get_submodule(module_name) if module_name else tower
        target = getattr(owner, attr, None)
        if isinstance(target, (torch.nn.Module, torch.nn.Parameter)):
            target.requires_grad_(False)
    for name in family.frozen_parameters:
        tower.get_parameter(name).requires_grad_(False)


def tower_features(
    tower: PreTrainedModel, pixel_values: torch.Tensor, num_prefix_tokens: int
) -> torch.Tensor:
    """The visual tokens the projector receives: last hidden state of the truncated tower, prefix dropped."""
    out = tower(pixel_values, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    if hidden.dim() == 4:  # convolutional feature map [B, C, H, W] -> tokens [B, H*W, C]
        return hidden.flatten(2).transpose(1, 2)
    return hidden[:, num_prefix_tokens:]


def image_processor_for(family: EncoderFamily, image_size: int, crop_size: int | None = None):
    """A PIL-backend image processor with the family's resize, crop and normalisation."""
    resample = {"bicubic": 3, "bilinear": 2}[family.resample]
    cls = getattr(transformers, family.processor_class)
    common = {"image_mean": list(family.mean), "image_std": list(family.std), "resample": resample}
    if family.center_crop:
        crop = crop_size or image_size
        return cls(
            size={"shortest_edge": crop},
            crop_size={"height": crop, "width": crop},
            do_center_crop=True,
            **common,
        )
    if family.processor_class == "ConvNextImageProcessor":
        return cls(size={"shortest_edge": image_size}, crop_pct=1.0, **common)
    return cls(size={"height": image_size, "width": image_size}, **common)
