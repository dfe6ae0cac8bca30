"""Stage 2 through scripts/train/sft.sh and dpo.sh (scripts/train/paths.sh) on CPU, tiny presets.

Relative paths are read from the caller's directory (the scripts change to the repository root); a missing
CKPT_PATH is refused unless FROM_SCRATCH=1, and the output is named after what was really loaded.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import train_fixtures

pytestmark = pytest.mark.slow
train_data = train_fixtures.train_data  # the session fixture, shared through a module cache

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts" / "train"


def _run(script: str, cwd: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    base = {
        **os.environ,
        "PYTHON": sys.executable,
        "GLOBAL_BATCH": "2",
        "PER_DEVICE_BATCH": "2",
        "WORKERS": "0",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        ["bash", str(SCRIPTS / script), *args], cwd=cwd, env={**base, **env}, capture_output=True, text=True
    )


@pytest.fixture(scope="module")
def stage1(train_data, tmp_path_factory) -> Path:
    """A tiny LLaVA checkpoint standing for a Stage-1 run."""
    import transformers

    from llava.model.builder import ModelConfig, build_model, save_model

    root = tmp_path_factory.mktemp("stage1")
    transformers.set_seed(0)
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(train_data.llm), vision_tower=str(train_data.vision_tower))
    )
    save_model(model, tokenizer, processor, root / "my_stage1")
    return root / "my_stage1"


@pytest.mark.parametrize("script", ["sft.sh", "dpo.sh"])
def test_a_missing_ckpt_path_is_refused_unless_from_scratch(train_data, tmp_path, script):
    # Before: a mistyped CKPT_PATH silently built a fresh model from LLM_VERSION/VISION_MODEL_VERSION.
    env = {"CKPT_PATH": "runs/stage1_typo", "OUTPUT_DIR": str(tmp_path / "out")}
    result = _run(script, tmp_path, env)
    assert result.returncode == 2
    assert f"no Stage-1 checkpoint at CKPT_PATH={tmp_path}/runs/stage1_typo" in result.stderr
    assert "FROM_SCRATCH=1" in result.stderr and not (tmp_path / "out").exists()
    scratch = {
        **env,
        "FROM_SCRATCH": "1",
        "LLM_VERSION": str(train_data.llm),
        "VISION_MODEL_VERSION": str(train_data.vision_tower),
    }
    result = _run(script, tmp_path, scratch, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--llm {train_data.llm} --vision_tower {train_data.vision_tower}" in result.stdout


def test_the_output_is_named_after_the_checkpoint_loaded(stage1, tmp_path):
    # Before: with a valid CKPT_PATH, LLM_VERSION/VISION_MODEL_VERSION were ignored but named the output.
    env = {"CKPT_PATH": str(stage1), "LLM_VERSION": "qwen2.5-7b", "VISION_MODEL_VERSION": "dinov2-g"}
    result = _run("sft.sh", tmp_path, env, "--help")
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"--model_name_or_path {stage1} " in result.stdout
    assert "out=runs/stage2/my_stage1_sft " in result.stdout
    checkpoint = stage1.parent / "run" / "checkpoint-500"
    checkpoint.mkdir(parents=True)
    result = _run("dpo.sh", tmp_path, {"CKPT_PATH": str(checkpoint)}, "--help")
    assert "out=runs/stage2/run_checkpoint-500_dpo " in result.stdout


def test_relative_paths_are_read_from_the_callers_directory(train_data, stage1, tmp_path):
    # Before: the scripts cd to the repository root, so a CKPT_PATH valid from the caller's directory was
    # not found there and a fresh model was trained instead.
    (tmp_path / "ckpt").symlink_to(stage1)
    (tmp_path / "world").symlink_to(train_data.world)
    (tmp_path / "sft.json").write_text(train_data.sft_json.read_text())
    env = {"CKPT_PATH": "ckpt", "DATA_PATH": "sft.json", "IMAGE_FOLDER": "world", "OUTPUT_DIR": "out"}
    result = _run("sft.sh", tmp_path, env, "--max_steps", "1", "--save_strategy", "no")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"--model_name_or_path {tmp_path}/ckpt " in result.stdout
    assert (tmp_path / "out" / "model.safetensors").is_file()
