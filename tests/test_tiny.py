"""Offline tiny presets (`python -m llava.tiny OUT_DIR`): every directory loads with plain transformers,
and the same seed writes the same bytes in another process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import transformers

from llava.model.encoders import ENCODER_FAMILIES
from llava.tiny import main, write_vision

# What each directory must load as with `AutoModel` (the module docstring of llava.tiny).
VISION_CLASSES = {
    "siglip": "SiglipVisionModel",
    "clip": "CLIPVisionModel",
    "dinov2": "Dinov2Model",
    "dinov2_reg": "Dinov2WithRegistersModel",
    "mae": "ViTMAEModel",
    "vit": "ViTModel",
    "convnext": "ConvNextModel",
}


@pytest.fixture(scope="module")
def cli_dir(tmp_path_factory):
    """The presets written by the command line in a separate process (default seed, like `tiny_dir`)."""
    out = tmp_path_factory.mktemp("tiny_cli")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "llava.tiny", str(out)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_cli_writes_every_directory(cli_dir):
    assert {p.name for p in cli_dir.iterdir()} == {"llm", *VISION_CLASSES}
    assert set(VISION_CLASSES) == set(ENCODER_FAMILIES), "every registry entry needs a tiny preset"


@pytest.mark.parametrize("name", sorted(VISION_CLASSES))
def test_vision_directory_loads_with_transformers(cli_dir, name):
    model = transformers.AutoModel.from_pretrained(cli_dir / name)
    assert type(model).__name__ == VISION_CLASSES[name]
    processor = transformers.AutoImageProcessor.from_pretrained(cli_dir / name)
    family = ENCODER_FAMILIES[name]
    assert tuple(processor.image_mean) == family.mean and tuple(processor.image_std) == family.std


def test_llm_directory_loads_with_transformers(cli_dir):
    model = transformers.AutoModelForCausalLM.from_pretrained(cli_dir / "llm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(cli_dir / "llm")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert len(tokenizer) <= model.get_input_embeddings().num_embeddings
    assert len(tokenizer("<image>", add_special_tokens=False)["input_ids"]) == 1
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids("<|im_end|>")


def test_same_seed_writes_identical_weights_in_another_process(cli_dir, tiny_dir):
    files = sorted(p.relative_to(cli_dir) for p in cli_dir.rglob("*.safetensors"))
    assert len(files) == len(VISION_CLASSES) + 1
    for rel in files:
        assert (cli_dir / rel).read_bytes() == (tiny_dir / rel).read_bytes(), rel
    assert (cli_dir / "llm/tokenizer.json").read_bytes() == (tiny_dir / "llm/tokenizer.json").read_bytes()


def test_other_seed_writes_other_weights(tiny_dir, tmp_path):
    write_vision("vit", tmp_path, seed=1)
    assert (tmp_path / "model.safetensors").read_bytes() != (tiny_dir / "vit/model.safetensors").read_bytes()


def test_cli_writes_a_subset_of_towers(tmp_path):
    main([str(tmp_path), "--towers", "clip", "--image_size", "48"])
    assert {p.name for p in tmp_path.iterdir()} == {"llm", "clip"}
    assert transformers.AutoConfig.from_pretrained(tmp_path / "clip").image_size == 48


def test_unknown_tiny_tower_is_refused_before_anything_is_written(tmp_path, capsys):
    from llava.tiny import main

    out = tmp_path / "tiny"
    with pytest.raises(SystemExit) as exit_info:
        main([str(out), "--towers", "sigclip"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "unknown tiny tower(s) 'sigclip'" in message and "closest: siglip" in message
    assert not out.exists()
