"""patches/: each runtime patch against the pinned upstream version."""

from __future__ import annotations

import torch

from llava.model.builder import ModelConfig, build_model
from patches.checkpoint_keys import checkpoint_state_for, safetensors_files


def test_checkpoint_keys_map_saved_llava_tensors_onto_the_model(tiny_dir, tmp_path):
    torch.manual_seed(0)
    model, _, _ = build_model(ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "siglip")))
    model.save_pretrained(tmp_path)
    files = safetensors_files(tmp_path)
    assert [f.name for f in files] == ["model.safetensors"]
    state = checkpoint_state_for(model, files)
    own = model.state_dict()
    tied = {"lm_head.weight"}  # saved once, as the input embedding
    assert set(state) == set(own) - tied
    for name, tensor in state.items():
        assert torch.equal(tensor, own[name]), name
    assert safetensors_files(tmp_path / "nowhere") == []
