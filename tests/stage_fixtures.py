"""Helpers shared by the export, Stage-1 script and Stage-3 tests: a tiny world and tiny training runs."""

from __future__ import annotations

from pathlib import Path

import torch

TRAIN_FLAGS = [
    "--loss_type", "sft",
    "--reference", "none",
    "--per_device_train_batch_size", "2",
    "--report_to", "none",
    "--use_cpu", "True",
    "--dataloader_num_workers", "0",
    "--seed", "0",
]  # fmt: skip


def write_world(root: Path) -> Path:
    """The synthetic world (docs/CONTRACTS.md §2) with 32-pixel images, small enough for unit tests."""
    from llava.data.synthetic import generate_world

    world = root / "world"
    generate_world(world, seed=0, num_train=12, num_val=2, image_size=32)
    return world


def train(argv: list[str]):
    """Run `python -m llava.train.train` in-process; returns the trainer."""
    from llava.train.train import main

    return main([*argv, *TRAIN_FLAGS])


def tower_state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.model.vision_tower.state_dict().items()}


def exported_tokens(export_dir: Path, pixel_values: torch.Tensor) -> torch.Tensor:
    """The LLM visual tokens from an export, read exactly as docs/CONTRACTS.md §1 says (transformers only)."""
    import json

    import transformers
    from safetensors.torch import load_file

    meta = json.loads((export_dir / "export.json").read_text())
    encoder = transformers.AutoModel.from_pretrained(str(export_dir / "vision_encoder"))
    weights = load_file(str(export_dir / "projector" / "model.safetensors"))
    with torch.no_grad():
        hidden = encoder(pixel_values, output_hidden_states=True).hidden_states[meta["feature_layer"]]
        features = hidden[:, meta["num_prefix_tokens"] :]
        inner = torch.nn.functional.linear(features, weights["linear_1.weight"], weights["linear_1.bias"])
        return torch.nn.functional.linear(
            torch.nn.functional.gelu(inner), weights["linear_2.weight"], weights["linear_2.bias"]
        )


def mllm_tokens(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """The visual tokens the MLLM itself computes (HF `get_image_features`), [B, N, D]."""
    with torch.no_grad():
        return torch.stack(list(model.model.get_image_features(pixel_values=pixel_values).pooler_output))
