"""Short names for the paper's LLMs and vision encoders (arXiv 2510.16333, §4 and appendix E).

`resolve_llm` / `resolve_vision_tower` turn a short name into what `from_pretrained` takes: a hub id,
or a local directory. Anything that is not a preset name (a hub id or a path) passes through
unchanged, so scripts can name either. Two encoders have no HF-format release and need a local
converted checkpoint named by an environment variable. Ensembles are written "A+B" (each part a
preset, hub id or path). Presets whose checkpoint's `model_type` does not identify their preprocessing
(MoCo-v3 converted to the HF ViT layout) name it in `PRESET_PREPROCESSING`, used when the converted
directory has no preprocessor_config.json.
"""

from __future__ import annotations

import os

from llava.model.encoders import MOCO_V3_PREPROCESSING, EncoderFamily

LLM_PRESETS: dict[str, str] = {
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-3b": "Qwen/Qwen2.5-3B-Instruct",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
}

VISION_PRESETS: dict[str, str] = {
    "siglip2-b16": "google/siglip2-base-patch16-384",
    "siglip2-l16": "google/siglip2-large-patch16-384",
    "siglip2-so16": "google/siglip2-so400m-patch16-384",
    "siglip2-g16": "google/siglip2-giant-opt-patch16-384",
    "siglip1-so14": "google/siglip-so400m-patch14-384",
    "clip-l14-336": "openai/clip-vit-large-patch14-336",
    "dinov2-l": "facebook/dinov2-large",
    "dinov2-g": "facebook/dinov2-giant",
    "mae-h14": "facebook/vit-mae-huge",
    "vit-h14-in21k": "google/vit-huge-patch14-224-in21k",
}

# Encoders without an HF-format release: convert once, then point the variable at the directory.
LOCAL_VISION_PRESETS: dict[str, tuple[str, str]] = {
    "moco-v3-b16": ("PIVOT_MOCO_V3_B16", "MoCo-v3 ViT-B/16 converted to the HF ViTModel layout"),
    "convnext-xxl": (
        "PIVOT_CONVNEXT_XXL",
        "open_clip CLIP-ConvNeXt-XXL converted to the HF ConvNextModel layout",
    ),
}

PRESET_PREPROCESSING: dict[str, EncoderFamily] = {"moco-v3-b16": MOCO_V3_PREPROCESSING}

ENSEMBLE_SEPARATOR = "+"


def resolve_llm(name: str) -> str:
    """Hub id or path for an LLM preset name; other strings pass through."""
    return LLM_PRESETS.get(name.lower(), name)


def resolve_vision_tower(name: str) -> str:
    """Hub id or path for one vision-tower preset name; other strings pass through."""
    key = name.lower()
    if key in VISION_PRESETS:
        return VISION_PRESETS[key]
    if key in LOCAL_VISION_PRESETS:
        variable, what = LOCAL_VISION_PRESETS[key]
        path = os.environ.get(variable)
        if not path:
            raise ValueError(
                f"Vision preset {name!r} needs a local checkpoint: set {variable} to the directory of {what}."
            )
        return path
    return name


def _parts(name: str) -> list[str]:
    return [part.strip() for part in name.split(ENSEMBLE_SEPARATOR) if part.strip()]


def split_ensemble(name: str) -> list[str]:
    """The resolved members of an "A+B" ensemble name (one member for a single tower)."""
    return [resolve_vision_tower(part) for part in _parts(name)]


def ensemble_preprocessing(name: str) -> list[EncoderFamily | None]:
    """Per member of `name`, the preset's own preprocessing (`PRESET_PREPROCESSING`) or None."""
    return [PRESET_PREPROCESSING.get(part.lower()) for part in _parts(name)]
