"""Stage 1 through the shell scripts (scripts/train/stage1_proj.sh then stage1_full.sh) on CPU, tiny presets.

Checks the recipe the scripts encode: 1a trains the projector only and writes the projector alone
(reloadable with --pretrain_mm_mlp_adapter) next to a full checkpoint; 1b starts from that checkpoint,
reads a YAML mixture and trains every part with the vision tower at its own learning rate.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file
from stage_fixtures import write_world

from llava.model.builder import ModelConfig, build_model, load_model
from llava.train.args import ModelArguments
from llava.train.train import load_or_build_model

pytestmark = pytest.mark.slow
SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "train"


def _script(name: str, env: dict[str, str], *args: str) -> str:
    result = subprocess.run(
        ["bash", str(SCRIPTS / name), *args], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def runs(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("stage1")
    world = write_world(root)
    mixture = root / "single_image.yaml"
    mixture.write_text(
        f"datasets:\n  - json_path: {world / 'llava' / 'instruct.json'}\n    sampling_strategy: first:8\n"
    )
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "LLM_VERSION": str(tiny_dir / "llm"),
        "VISION_MODEL_VERSION": str(tiny_dir / "siglip"),
        "IMAGE_FOLDER": str(world),
        "GLOBAL_BATCH": "4",
        "PER_DEVICE_BATCH": "2",
        "WORKERS": "0",
        "SAVE_STEPS": "1",
        "HF_HUB_OFFLINE": "1",
    }
    log_1a = _script(
        "stage1_proj.sh",
        {**env, "DATA_PATH": str(world / "llava" / "pretrain.json"), "OUTPUT_DIR": str(root / "1a")},
        "--max_steps", "2",
    )  # fmt: skip
    log_1b = _script(
        "stage1_full.sh",
        {**env, "CKPT_PATH": str(root / "1a"), "DATA_PATH": str(mixture), "OUTPUT_DIR": str(root / "1b")},
        "--max_steps", "2",
    )  # fmt: skip
    return {"root": root, "env": env, "log_1a": log_1a, "log_1b": log_1b, "tiny": tiny_dir}


def _changed(a: dict, b: dict) -> list[str]:
    return [k for k in a if not torch.equal(a[k], b[k])]


def test_stage1a_trains_only_the_projector(runs):
    assert "(2 x GA 2)" in runs["log_1a"]  # GLOBAL_BATCH 4 = 2 per device x 1 CPU process x 2 accumulation
    trained, _, _ = load_model(runs["root"] / "1a")
    transformers.set_seed(42)  # the scripts' seed: the initial model, rebuilt
    initial, _, _ = build_model(
        ModelConfig(llm=str(runs["tiny"] / "llm"), vision_tower=str(runs["tiny"] / "siglip"))
    )
    before, after = initial.state_dict(), trained.state_dict()
    changed = _changed(after, before)
    assert changed and all("multi_modal_projector" in k for k in changed)
    assert len(changed) == 4  # linear_1/2 weight and bias
    alone = load_file(runs["root"] / "1a" / "projector" / "model.safetensors")
    projector = trained.model.multi_modal_projector.state_dict()
    assert alone.keys() == projector.keys() and not _changed(alone, projector)
    assert (runs["root"] / "1a" / "checkpoint-2" / "vision_encoder" / "model.safetensors").exists()


def test_projector_alone_reloads_into_a_fresh_build(runs):
    model, _, _ = load_or_build_model(
        ModelArguments(
            llm=str(runs["tiny"] / "llm"),
            vision_tower=str(runs["tiny"] / "siglip"),
            pretrain_mm_mlp_adapter=str(runs["root"] / "1a" / "projector"),
        ),
        "float32",
    )
    stage1a, _, _ = load_model(runs["root"] / "1a")
    assert not _changed(model.state_dict(), stage1a.state_dict())


def test_stage1b_starts_from_1a_and_trains_every_part(runs):
    log = runs["log_1b"]
    assert "): 8 records, 0 with errors" in log  # the mixture's first:8 (llava.data.validation)
    group_lrs = {
        line.split()[0]: line.split("lr=")[1].split()[0] for line in log.splitlines() if " lr=" in line
    }
    assert group_lrs == {"mm_language_model": "1e-05", "mm_mlp_adapter": "1e-05", "mm_vision_tower": "2e-06"}
    start, _, _ = load_model(runs["root"] / "1a")
    end, _, _ = load_model(runs["root"] / "1b")
    for part in ("vision_tower", "multi_modal_projector", "language_model"):
        module_start, module_end = getattr(start.model, part), getattr(end.model, part)
        assert _changed(module_end.state_dict(), module_start.state_dict()), f"{part} did not train"
    assert (runs["root"] / "1b" / "export.json").exists()


def test_global_batch_must_split_evenly(runs, tmp_path):
    env = {**runs["env"], "GLOBAL_BATCH": "5", "DATA_PATH": "unused.json", "OUTPUT_DIR": str(tmp_path)}
    result = subprocess.run(
        ["bash", str(SCRIPTS / "stage1_proj.sh")], env=env, capture_output=True, text=True
    )
    assert result.returncode != 0 and "not a multiple" in result.stderr
