"""Offline tiny presets: `python -m llava.tiny OUT_DIR` writes small random-initialised models.

Writes, with no network, normal HF directories that `from_pretrained` loads through the same code
path as hub ids (DESIGN §2 "Offline tiny presets"):

    OUT_DIR/llm/          tiny Qwen2 causal LM + a locally trained byte-level BPE tokenizer (ChatML, <image>)
    OUT_DIR/siglip/       SiglipVisionModel      OUT_DIR/clip/        CLIPVisionModel
    OUT_DIR/dinov2/       Dinov2Model            OUT_DIR/dinov2_reg/  Dinov2WithRegistersModel (4 registers)
    OUT_DIR/mae/          ViTMAEModel            OUT_DIR/vit/         ViTModel
    OUT_DIR/convnext/     ConvNextModel

Each vision directory also holds its image processor (PIL backend). Weights are seeded, so the same
command writes the same tensors.
"""

from __future__ import annotations

import argparse
import difflib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

from llava.model.encoders import ENCODER_FAMILIES, image_processor_for
from llava.model.tiny_tokenizer import build_tiny_tokenizer

logger = logging.getLogger(__name__)


def _vit_kwargs(image_size: int, patch_size: int, hidden: int, layers: int) -> dict:
    return {
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 2,
        "intermediate_size": hidden * 2,
        "image_size": image_size,
        "patch_size": patch_size,
    }


def tiny_vision_configs(image_size: int = 32, patch_size: int = 8, hidden: int = 32, layers: int = 3) -> dict:
    """family name → (config factory, model class name) for every tiny tower."""
    vit = _vit_kwargs(image_size, patch_size, hidden, layers)
    factories: dict[str, Callable[[], transformers.PretrainedConfig]] = {
        "siglip": lambda: transformers.SiglipVisionConfig(**vit),
        "clip": lambda: transformers.CLIPVisionConfig(**vit),
        "dinov2": lambda: transformers.Dinov2Config(**vit),
        "dinov2_reg": lambda: transformers.Dinov2WithRegistersConfig(**vit, num_register_tokens=4),
        "mae": lambda: transformers.ViTMAEConfig(**vit, mask_ratio=0.75),
        "vit": lambda: transformers.ViTConfig(**vit),
        "convnext": lambda: transformers.ConvNextConfig(
            hidden_sizes=[8, 16, 24, hidden], depths=[1, 1, 1, 1], image_size=image_size * 2
        ),
    }
    classes = {
        "siglip": "SiglipVisionModel",
        "clip": "CLIPVisionModel",
        "dinov2": "Dinov2Model",
        "dinov2_reg": "Dinov2WithRegistersModel",
        "mae": "ViTMAEModel",
        "vit": "ViTModel",
        "convnext": "ConvNextModel",
    }
    return {name: (factories[name], classes[name]) for name in factories}


def tiny_llm_config(vocab_size: int, hidden: int = 64, layers: int = 2) -> transformers.Qwen2Config:
    return transformers.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=10000.0,
    )


def write_llm(out_dir: Path, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """The tiny Qwen2 LM (``hidden`` wide, ``layers`` deep) and the local tokenizer, saved to ``out_dir``."""
    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    model = transformers.Qwen2ForCausalLM(tiny_llm_config(len(tokenizer), hidden, layers))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_vision(
    name: str,
    out_dir: Path,
    seed: int = 0,
    image_size: int = 32,
    layers: int = 3,
    hidden: int = 32,
    patch_size: int = 8,
) -> Path:
    """Tower ``name`` of :func:`tiny_vision_configs` with its PIL image processor, saved to ``out_dir``."""
    factory, class_name = tiny_vision_configs(image_size, patch_size, hidden, layers)[name]
    config = factory()
    torch.manual_seed(seed)
    getattr(transformers, class_name)(config).save_pretrained(out_dir)
    family = ENCODER_FAMILIES[name]
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    image_processor_for(family, size).save_pretrained(out_dir)
    return out_dir


def unknown_towers(towers: tuple[str, ...]) -> str | None:
    """A message naming each unknown tiny tower and the closest known ones, or None if all are known."""
    known = tuple(tiny_vision_configs())
    unknown = [name for name in towers if name not in known]
    if not unknown:
        return None
    hints = {name: difflib.get_close_matches(name, known, n=3, cutoff=0.3) for name in unknown}
    named = ", ".join(f"{name!r} (closest: {', '.join(hints[name]) or 'none'})" for name in unknown)
    return f"unknown tiny tower(s) {named}; choose from {', '.join(known)}"


@dataclass(frozen=True)
class TinySizes:
    """Widths and depths of the tiny presets (defaults: the test size; scripts/demo.sh passes larger ones)."""

    vision_hidden: int = 32
    vision_layers: int = 3
    patch_size: int = 8
    llm_hidden: int = 64
    llm_layers: int = 2

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if value < 1:
                raise ValueError(f"TinySizes.{name} must be >= 1, got {value}")
        if self.vision_hidden % 2 or self.llm_hidden % 4:
            raise ValueError(
                f"vision_hidden must be a multiple of 2 and llm_hidden of 4 (attention heads), "
                f"got {self.vision_hidden}, {self.llm_hidden}"
            )


def write_tiny_presets(
    out_dir: str | Path,
    seed: int = 0,
    image_size: int = 32,
    towers: tuple[str, ...] | None = None,
    sizes: TinySizes | None = None,
) -> dict[str, Path]:
    """Write the tiny LLM and vision towers; returns name → directory.

    Unknown tower names are refused before anything is written (`unknown_towers`); an
    ``image_size`` that ``sizes.patch_size`` does not divide is refused too.
    """
    sizes = sizes or TinySizes()
    if image_size % sizes.patch_size:
        raise ValueError(f"image_size {image_size} is not a multiple of patch_size {sizes.patch_size}")
    problem = unknown_towers(towers or ())
    if problem:
        raise ValueError(problem)
    out = Path(out_dir)
    paths = {"llm": write_llm(out / "llm", seed, sizes.llm_hidden, sizes.llm_layers)}
    for name in towers or tuple(tiny_vision_configs()):
        paths[name] = write_vision(
            name, out / name, seed, image_size, sizes.vision_layers, sizes.vision_hidden, sizes.patch_size
        )
    return paths


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="directory to write the tiny presets into")
    parser.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    parser.add_argument("--image_size", type=int, default=32, help="tower input resolution")
    parser.add_argument("--towers", nargs="*", default=None, help="subset of towers to write (default: all)")
    defaults = TinySizes()
    for field_name, help_text in (
        ("vision_hidden", "vision tower width"),
        ("vision_layers", "vision tower depth"),
        ("patch_size", "vision patch size (divides --image_size)"),
        ("llm_hidden", "Qwen2 width (multiple of 4)"),
        ("llm_layers", "Qwen2 depth"),
    ):
        parser.add_argument(
            f"--{field_name}", type=int, default=getattr(defaults, field_name), help=help_text
        )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    towers = tuple(args.towers) if args.towers else None
    problem = unknown_towers(towers or ())
    if problem:
        parser.error(problem)
    sizes = TinySizes(
        args.vision_hidden, args.vision_layers, args.patch_size, args.llm_hidden, args.llm_layers
    )
    paths = write_tiny_presets(args.out_dir, args.seed, args.image_size, towers, sizes)
    for name, path in paths.items():
        logger.info("%-10s %s", name, path)


if __name__ == "__main__":
    main()
