"""Stage 0 (llava.train.stage0, scripts/train/stage0.sh): tiny-tower pretraining on the synthetic world.

A short run must lower the multi-label loss, save a tower that plain `AutoModel` reloads with the trained
weights and its image processor, and that the Stage-1 builder accepts as a vision tower; targets are
checked against the scene by hand; bad configs fail fast.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers

from llava.data.synthetic import generate_world
from llava.data.synthetic_scene import COLOURS, SHAPES
from llava.tiny import write_vision
from llava.train.stage0 import Stage0Config, pretrain_tower, scene_targets

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "train" / "stage0.sh"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("stage0")
    generate_world(root / "world", seed=0, num_train=24, num_val=4, image_size=32)
    write_vision("siglip", root / "siglip", seed=0, image_size=32)
    return root


def test_targets_name_colours_shapes_and_count():
    scene = {"objects": [{"colour": "blue", "shape": "star"}, {"colour": "red", "shape": "star"}]}
    target = scene_targets(scene, max_objects=4)
    expected = np.zeros(len(COLOURS) + len(SHAPES) + 4, dtype=np.float32)
    expected[[list(COLOURS).index("blue"), list(COLOURS).index("red")]] = 1
    expected[len(COLOURS) + SHAPES.index("star")] = 1
    expected[len(COLOURS) + len(SHAPES) + 1] = 1  # two objects
    assert np.array_equal(target, expected)
    with pytest.raises(ValueError, match="max_objects"):
        scene_targets(scene, max_objects=1)


def test_short_run_lowers_the_loss_and_saves_a_reloadable_tower(setup):
    out = setup / "tower"
    config = Stage0Config(
        str(setup / "siglip"), str(setup / "world"), str(out), steps=40, batch_size=16, log_every=0
    )
    log = pretrain_tower(config)
    first, last = np.mean(log["losses"][:5]), np.mean(log["losses"][-5:])
    assert last < 0.8 * first, (first, last)
    assert json.loads((out / "stage0_log.json").read_text())["steps"] == 40
    before = transformers.AutoModel.from_pretrained(setup / "siglip")
    after = transformers.AutoModel.from_pretrained(out)
    assert type(after).__name__ == "SiglipVisionModel"
    moved = [
        name
        for (name, a), (_, b) in zip(before.named_parameters(), after.named_parameters())
        if not torch.equal(a, b)
    ]
    assert any("encoder.layers.0" in name for name in moved)  # trained weights were saved
    processor = transformers.AutoImageProcessor.from_pretrained(out)
    assert processor.size["height"] == after.config.image_size == 32


def test_script_writes_a_tower_the_stage1_builder_loads(setup, tiny_dir):
    from llava.model.builder import ModelConfig, build_model

    out = setup / "script_tower"
    env = {**os.environ, "PYTHON": sys.executable, "VISION_MODEL_VERSION": str(setup / "siglip")}
    env.update(WORLD=str(setup / "world"), OUTPUT_DIR=str(out), STEPS="3", BATCH="4")
    result = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    model, _, _ = build_model(ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(out)))
    assert model.config.vision_config.hidden_size == 32


def test_bad_config_fails_fast(setup):
    world, tower = str(setup / "world"), str(setup / "siglip")
    with pytest.raises(ValueError, match="steps"):
        Stage0Config(tower, world, "out", steps=0)
    with pytest.raises(FileNotFoundError, match="scenes.jsonl"):
        Stage0Config(tower, str(setup), "out")
