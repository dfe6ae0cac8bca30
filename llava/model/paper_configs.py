"""The paper's model sizes as config dicts, and MLLMs built from them with random weights (no download).

Song et al. 2025 (arXiv 2510.16333, §4 and appendix E) train Qwen2.5-{0.5B,1.5B,3B,7B}-Instruct with
SigLIP2 B/16, L/16, So400m/16 and g-opt/16 at 384² (patch 16 → 24 × 24 = 576 image tokens). The dicts
below copy the architecture fields of the released `config.json` files (hub ids in the comments; for
SigLIP2 the `vision_config` of the fixed-resolution checkpoints, which are `model_type: siglip`).
Throughput runs and FLOP counts at the real sizes need only these shapes, not the weights.

`build_model_from_configs` writes each config (plus the offline tiny tokenizer, whose ids all fit the
Qwen2.5 vocabulary) to a directory and builds through `llava.model.builder.build_model` with
`from_config_only=True`, so the model is exactly what `--llm/--vision_tower` would build (tower truncated
to `mm_vision_select_layer`, `mlp2x_gelu` projector). Tensors go to the device of the enclosing
`torch.device(...)` context: `with torch.device("cuda"):` initialises on the GPU, `"meta"` allocates nothing.
"""

from __future__ import annotations

import atexit
import json
import tempfile
from pathlib import Path

import torch
import transformers
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llava.model.builder import ModelConfig, build_model
from llava.model.encoders import ENCODER_FAMILIES, image_processor_for

_QWEN2_COMMON = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "hidden_act": "silu",
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "use_sliding_window": False,
    "sliding_window": 32768,
    "attention_dropout": 0.0,
    "initializer_range": 0.02,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

LLM_CONFIGS: dict[str, dict] = {
    # Qwen/Qwen2.5-0.5B-Instruct (0.49B parameters, 0.36B without embeddings)
    "qwen2.5-0.5b": {
        **_QWEN2_COMMON,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_window_layers": 21,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # Qwen/Qwen2.5-1.5B-Instruct (1.54B, 1.31B without embeddings)
    "qwen2.5-1.5b": {
        **_QWEN2_COMMON,
        "hidden_size": 1536,
        "intermediate_size": 8960,
        "num_hidden_layers": 28,
        "num_attention_heads": 12,
        "num_key_value_heads": 2,
        "max_window_layers": 21,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # Qwen/Qwen2.5-3B-Instruct (3.09B, 2.77B without embeddings)
    "qwen2.5-3b": {
        **_QWEN2_COMMON,
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_window_layers": 70,
        "vocab_size": 151936,
        "tie_word_embeddings": True,
    },
    # Qwen/Qwen2.5-7B-Instruct (7.61B, 6.53B without embeddings); the 7B release pads its vocabulary
    # to 152064 and does not tie the LM head to the embeddings.
    "qwen2.5-7b": {
        **_QWEN2_COMMON,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_window_layers": 28,
        "vocab_size": 152064,
        "tie_word_embeddings": False,
    },
}

_SIGLIP_COMMON = {
    "model_type": "siglip_vision_model",
    "image_size": 384,
    "patch_size": 16,
    "num_channels": 3,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}

VISION_CONFIGS: dict[str, dict] = {
    # google/siglip2-base-patch16-384 (vision_config): ViT-B/16, ~86M parameters
    "siglip2-b16": {
        **_SIGLIP_COMMON,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
    },
    # google/siglip2-large-patch16-384 (vision_config): ViT-L/16, ~303M
    "siglip2-l16": {
        **_SIGLIP_COMMON,
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
    },
    # google/siglip2-so400m-patch16-384 (vision_config): shape-optimised So400m/16, ~400M
    "siglip2-so16": {
        **_SIGLIP_COMMON,
        "hidden_size": 1152,
        "intermediate_size": 4304,
        "num_hidden_layers": 27,
        "num_attention_heads": 16,
    },
    # google/siglip2-giant-opt-patch16-384 (vision_config): g-opt/16, ~1.1B
    "siglip2-g16": {
        **_SIGLIP_COMMON,
        "hidden_size": 1536,
        "intermediate_size": 6144,
        "num_hidden_layers": 40,
        "num_attention_heads": 16,
    },
}

IMAGE_TOKENS = 576  # (384 / 16)² for every SigLIP2 config above


def _lookup(name_or_dict: str | dict, registry: dict[str, dict], what: str) -> dict:
    if isinstance(name_or_dict, dict):
        return dict(name_or_dict)
    key = name_or_dict.lower()
    if key not in registry:
        raise ValueError(f"unknown {what} config {name_or_dict!r}; choose one of {sorted(registry)}.")
    return dict(registry[key])


def llm_config(name_or_dict: str | dict) -> transformers.PretrainedConfig:
    """The HF config of a paper LLM (`LLM_CONFIGS` key) or of a config dict with a `model_type`."""
    settings = _lookup(name_or_dict, LLM_CONFIGS, "LLM")
    settings.pop("architectures", None)
    return transformers.AutoConfig.for_model(settings.pop("model_type", "qwen2"), **settings)


def vision_config(name_or_dict: str | dict) -> transformers.SiglipVisionConfig:
    """The HF config of a paper vision tower (`VISION_CONFIGS` key) or of a SigLIP vision config dict."""
    settings = _lookup(name_or_dict, VISION_CONFIGS, "vision")
    settings.pop("model_type", None)
    return transformers.SiglipVisionConfig(**settings)


_TOKENIZER_DIRS: dict[str, Path] = {}


def _tokenizer_dir() -> Path:
    """The offline tiny tokenizer, trained once per process (it takes seconds) and saved to a temp dir."""
    if "dir" not in _TOKENIZER_DIRS:
        from llava.model.tiny_tokenizer import build_tiny_tokenizer

        holder = tempfile.TemporaryDirectory(prefix="pivot_tokenizer_")
        atexit.register(holder.cleanup)
        build_tiny_tokenizer().save_pretrained(holder.name)
        _TOKENIZER_DIRS["dir"] = Path(holder.name)
    return _TOKENIZER_DIRS["dir"]


def write_config_dirs(llm: str | dict, vision: str | dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Write `llm/` (config.json + tokenizer) and `vision/` (config.json + image processor) under
    `out_dir`, directories that `build_model(ModelConfig(..., from_config_only=True))` reads."""
    out = Path(out_dir)
    llm_dir, vision_dir = out / "llm", out / "vision"
    text = llm_config(llm)
    tokenizer = transformers.AutoTokenizer.from_pretrained(_tokenizer_dir())
    if text.vocab_size < len(tokenizer):
        raise ValueError(
            f"LLM config vocab_size {text.vocab_size} is smaller than the offline tokenizer ({len(tokenizer)} "
            "tokens); use vocab_size >= that."
        )
    text.save_pretrained(llm_dir)
    tokenizer.save_pretrained(llm_dir)
    tower = vision_config(vision)
    tower.save_pretrained(vision_dir)
    image_processor_for(ENCODER_FAMILIES["siglip"], tower.image_size).save_pretrained(vision_dir)
    return llm_dir, vision_dir


def build_model_from_configs(
    llm: str | dict,
    vision: str | dict,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    mm_vision_select_layer: int | None = None,
    work_dir: str | Path | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, object]:
    """The MLLM of a paper LLM + vision config (names or dicts) with random weights; see the module
    docstring. Returns (model, tokenizer, image_processor) like `build_model`."""
    with tempfile.TemporaryDirectory(prefix="pivot_configs_") as tmp:
        llm_dir, vision_dir = write_config_dirs(llm, vision, work_dir or tmp)
        cfg = ModelConfig(
            llm=str(llm_dir),
            vision_tower=str(vision_dir),
            mm_vision_select_layer=mm_vision_select_layer,
            dtype=dtype,
            attn_implementation=attn_implementation,
            from_config_only=True,
        )
        model, tokenizer, image_processor = build_model(cfg)
    model.config.mm_language_model = _label(llm)
    model.config.mm_vision_tower = _label(vision)
    return model, tokenizer, image_processor


def _label(name_or_dict: str | dict) -> str:
    return name_or_dict if isinstance(name_or_dict, str) else json.dumps(name_or_dict, sort_keys=True)


def describe(model: PreTrainedModel) -> dict[str, int]:
    """Parameter counts of the built MLLM's parts (works on the meta device too)."""

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    return {
        "vision_params": count(model.model.vision_tower),
        "projector_params": count(model.model.multi_modal_projector),
        "llm_params": count(model.model.language_model)
        + (0 if model.config.tie_word_embeddings else count(model.lm_head)),
        "vision_layers_used": int(model.config.vision_config.num_hidden_layers),
    }
