"""Vision-encoder registry: one entry per encoder family, one uniform way to build a tower.

Each `EncoderFamily` says which transformers class loads the tower, its input resolution and
normalisation, how images are resized/cropped, which hidden layer feeds the projector by default
(LLaVA-NeXT's `mm_vision_select_layer`), how many prefix tokens (CLS, registers) to drop, and which
modules are not on the feature path. Adding an encoder family is one entry in `ENCODER_FAMILIES`.

Conventions (DESIGN §2, LLaVA-OneVision):
- The tower is built truncated to the layer actually used: with `select_layer = -2` on a 27-layer
  SigLIP, the tower keeps 26 layers and the projector reads `hidden_states[-1]` of the truncated tower.
  Modules after the feature point (post-norms, pooling heads) stay in the checkpoint, so plain
  transformers loads it, but are frozen: every trainable parameter receives a gradient.
- Feature point: CLIP/SigLIP are read *before* their post-norm (LLaVA's `hidden_states[select_layer]`).
  Families with a `final_norm` (DINOv2, MAE, MoCo/supervised ViT) are read *after* it when the selected
  layer is the last one, as PIVOT does (DINOv2 `last_hidden_state`, timm `forward_features`); the norm
  is then trained. The truncated config records this as `tie_last_hidden_states: true`, which makes
  transformers' ViTModel put the post-norm state in `hidden_states[-1]` (plain HF); Dinov2Model ignores
  it, so DINOv2 read after its norm goes through `PivotMultiTower`. A non-last layer is read pre-norm.
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
from dataclasses import dataclass, field, replace

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
    final_norm: str | None = None  # norm on last_hidden_state: read (and trained) at the last layer
    final_norm_in_hidden_states: bool = False  # transformers honours config.tie_last_hidden_states
    frozen_parameters: tuple[str, ...] = ()  # parameters fixed by design
    config_overrides: dict = field(default_factory=dict)  # applied when loading a tower
    vision_config_attr: str | None = None  # attribute holding the vision config in a full config
    crop_pct: float = 1.0  # centre-crop families: resize the shortest side to image_size / crop_pct
    force_resample: bool = False  # override a checkpoint processor's resampling filter with `resample`

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
        force_resample=True,  # LLaVA-OV's SigLipImageProcessor; some SigLIP2 hub processors say bilinear
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
        unused_modules=("embeddings.mask_token",),
        final_norm="layernorm",
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
        unused_modules=("embeddings.mask_token",),
        final_norm="layernorm",
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
        unused_modules=("pooler",),
        final_norm="layernorm",
        final_norm_in_hidden_states=True,
        frozen_parameters=("embeddings.position_embeddings",),
    ),
    "vit": EncoderFamily(
        # Supervised ViT (google/vit-*-in21k, trained on inputs scaled to [-1, 1], hence mean/std 0.5)
        # and MoCo-v3 converted to the HF ViT layout (preprocessing: `MOCO_V3_PREPROCESSING`).
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
        unused_modules=("pooler",),
        final_norm="layernorm",
        final_norm_in_hidden_states=True,
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

# MoCo-v3 converted to the HF ViT layout has model_type "vit", so its preprocessing cannot come from the
# registry: PIVOT's moco_encoder.py uses Resize(256) (shortest side, torchvision's bilinear default) +
# CenterCrop(224) and ImageNet statistics. Used when the converted directory has no preprocessor config.
MOCO_V3_PREPROCESSING = replace(
    ENCODER_FAMILIES["vit"],
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    resample="bilinear",
    center_crop=True,
    crop_pct=224 / 256,
    processor_class="BitImageProcessor",
)


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
    """Vision config truncated to the selected layer, with the family's overrides applied; for families with
    a final norm, `tie_last_hidden_states` records whether the features are read after it."""
    family = family_for_config(config)
    vision_config = vision_config_of(config)
    if family.name == "mae":
        vision_config = _mae_to_vit_config(vision_config)
    settings = {**vision_config.to_dict(), **family.config_overrides}
    if family.output == "tokens":
        depth = family.depth(vision_config)
        settings["num_hidden_layers"] = resolve_select_layer(select_layer, depth)
        if family.final_norm is not None:  # read after the final norm only at the last layer ...
            last = settings["num_hidden_layers"] == depth
            # ... unless the config is a tower already truncated to a pre-norm layer (an export)
            settings["tie_last_hidden_states"] = last and settings.get("tie_last_hidden_states") is not False
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
            "%s: %s tower truncated to %d of %d layers (mm_vision_select_layer=%d), read %s",
            name_or_path,
            family.name,
            vision_config.num_hidden_layers,
            family.depth(vision_config_of(config)),
            select_layer,
            f"after its final {family.final_norm}" if reads_final_norm(vision_config, family) else "pre-norm",
        )
    prepare_tower(tower, family)
    return tower, family, select_layer


def reads_final_norm(config: PretrainedConfig, family: EncoderFamily | None = None) -> bool:
    """Whether the tower's features are its output after the family's final norm (module docstring)."""
    family = family or family_for_config(config)
    return family.final_norm is not None and getattr(config, "tie_last_hidden_states", None) is True


def prepare_tower(tower: PreTrainedModel, family: EncoderFamily) -> None:
    """Freeze what is not on the feature path or fixed by design (see module docstring)."""
    unused = family.unused_modules
    if family.final_norm is not None and not reads_final_norm(tower.config, family):
        unused = (*unused, family.final_norm)
    for name in unused:
        module_name, _, attr = name.rpartition(".")
        owner = tower.get_submodule(module_name) if module_name else tower
        target = getattr(owner, attr, None)
        if isinstance(target, (torch.nn.Module, torch.nn.Parameter)):
            target.requires_grad_(False)
    for name in family.frozen_parameters:
        tower.get_parameter(name).requires_grad_(False)


def features_from_output(config: PretrainedConfig, output, num_prefix_tokens: int) -> torch.Tensor:
    """The visual tokens in a tower's output (`output_hidden_states=True`): its last hidden state (after
    the final norm where `reads_final_norm`), prefix dropped; feature maps become row-major tokens."""
    hidden = output.last_hidden_state if reads_final_norm(config) else output.hidden_states[-1]
    if hidden.dim() == 4:  # convolutional feature map [B, C, H, W] -> tokens [B, H*W, C]
        return hidden.flatten(2).transpose(1, 2)
    return hidden[:, num_prefix_tokens:]


def tower_features(
    tower: PreTrainedModel, pixel_values: torch.Tensor, num_prefix_tokens: int
) -> torch.Tensor:
    """The visual tokens the projector receives from a truncated tower (`features_from_output`)."""
    return features_from_output(
        tower.config, tower(pixel_values, output_hidden_states=True), num_prefix_tokens
    )


RESAMPLE_FILTERS = {"bicubic": 3, "bilinear": 2}  # PIL / transformers PILImageResampling values


def image_processor_for(family: EncoderFamily, image_size: int):
    """A PIL-backend image processor with the family's resize, crop and normalisation."""
    cls = getattr(transformers, family.processor_class)
    common = {
        "image_mean": list(family.mean),
        "image_std": list(family.std),
        "resample": RESAMPLE_FILTERS[family.resample],
    }
    if family.center_crop:
        return cls(
            size={"shortest_edge": round(image_size / family.crop_pct)},
            crop_size={"height": image_size, "width": image_size},
            do_center_crop=True,
            **common,
        )
    if family.processor_class == "ConvNextImageProcessor":
        return cls(size={"shortest_edge": image_size}, crop_pct=1.0, **common)
    return cls(size={"height": image_size, "width": image_size}, **common)


def processed_size(image_processor) -> tuple[int, int]:
    """(height, width) of the pixel values `image_processor` makes of a non-square image."""
    from PIL import Image

    pixels = image_processor(images=Image.new("RGB", (97, 89)), return_tensors="pt")["pixel_values"]
    return int(pixels.shape[-2]), int(pixels.shape[-1])


def conform_image_processor(image_processor, family: EncoderFamily, image_size: int, where: str):
    """The checkpoint's image processor, changed where it disagrees with how the tower is read.

    - Output size: the token grid follows the tower config's `image_size`, so a processor that outputs
      another size (facebook/dinov2-*: config 518, processor crop 224; ConvNeXt) is forced to it, as
      PIVOT's DINOv2 tower does (shortest side = crop = image_size; direct resizes stay direct).
    - Resampling: families with `force_resample` (SigLIP: bicubic, as LLaVA-OV) get their filter.
    Every change is logged; a processor that still disagrees is an error naming `where`.
    """
    changes: dict = {}
    if processed_size(image_processor) != (image_size, image_size):
        if getattr(image_processor, "crop_pct", None) is not None:  # ConvNeXt: crop_pct rule on shortest_edge
            changes["size"] = {"shortest_edge": image_size}
        elif getattr(image_processor, "do_center_crop", False):
            changes["size"] = {"shortest_edge": image_size}
            changes["crop_size"] = {"height": image_size, "width": image_size}
        else:
            changes["size"] = {"height": image_size, "width": image_size}
        logger.warning(
            "%s: the image processor outputs %s pixels but the %s tower's config has image_size %d; "
            "forcing the processor to %d (%s) so images give the token grid the model counts.",
            where,
            "x".join(map(str, processed_size(image_processor))),
            family.name,
            image_size,
            image_size,
            changes,
        )
    wanted = RESAMPLE_FILTERS[family.resample]
    current = getattr(image_processor, "resample", None)
    if family.force_resample and (current is None or int(current) != wanted):
        logger.warning(
            "%s: %s image processor resample=%s overridden with %s (%d).",
            where,
            family.name,
            image_processor.resample,
            family.resample,
            wanted,
        )
        changes["resample"] = wanted
    if not changes:
        return image_processor
    conformed = type(image_processor).from_dict(image_processor.to_dict(), **changes)
    if processed_size(conformed) != (image_size, image_size):
        raise ValueError(
            f"{where}: cannot make {type(image_processor).__name__} output {image_size}x{image_size} pixels "
            f"(it gives {processed_size(conformed)}); save a preprocessor_config.json that does."
        )
    return conformed


def base_tile_image_processor(family: EncoderFamily, image_size: int, image_mean, image_std, resample):
    """A single-image processor equal to LlavaOnevisionImageProcessor's base tile: a direct resize to
    `image_size` x `image_size` (no crop), then the given normalisation."""
    class_name = (
        "BitImageProcessor" if family.processor_class == "ConvNextImageProcessor" else family.processor_class
    )
    return getattr(transformers, class_name)(
        size={"height": image_size, "width": image_size},
        do_center_crop=False,
        image_mean=list(image_mean),
        image_std=list(image_std),
        resample=resample,
    )


def vision_image_processor(
    image_processor,
    family: EncoderFamily,
    image_size: int,
    *,
    base_tile: bool | None = None,
    where: str = "export",
):
    """The single-image processor that gives an exported tower of `family` the pixels the MLLM's tower saw.

    Anyres (`base_tile`, default: the processor has `image_grid_pinpoints`): a direct resize to
    `image_size`², as LlavaOnevisionImageProcessor makes the base tile, with the MLLM's normalisation and
    resampling. Otherwise the MLLM's processor made to agree with the tower (`conform_image_processor`).
    Without a processor: the encoder family's defaults.
    """
    if base_tile is None:
        base_tile = bool(getattr(image_processor, "image_grid_pinpoints", None))
    if base_tile:
        source = image_processor or image_processor_for(family, image_size)
        resample = getattr(source, "resample", None)
        return base_tile_image_processor(
            family,
            image_size,
            source.image_mean,
            source.image_std,
            RESAMPLE_FILTERS[family.resample] if resample is None else int(resample),
        )
    if image_processor is None:
        return image_processor_for(family, image_size)
    return conform_image_processor(image_processor, family, image_size, where)
