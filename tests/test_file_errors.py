"""Every file-reading error names the file (llava.file_checks; issue 15): caches, checkpoints, safetensors
headers, configs and the results JSONs the analysis modules read."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from llava.file_checks import FileFormatError, check_safetensors


def _safetensors(path: Path) -> Path:
    save_file({"a": torch.zeros(64, 64), "b": torch.ones(8)}, str(path))
    return path


@pytest.mark.parametrize(
    ("cut", "reason"),
    [
        (4, "shorter than the header length"),
        (40, "header of"),
        (-100, "truncated: its tensors need"),
    ],
)
def test_a_truncated_safetensors_file_names_itself(tmp_path, cut, reason):
    path = _safetensors(tmp_path / "model.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[:cut])
    with pytest.raises(FileFormatError, match=reason) as error:
        check_safetensors(path)
    assert str(path) in str(error.value)
    check_safetensors(_safetensors(tmp_path / "whole.safetensors"))


def test_a_corrupt_reference_cache_names_itself(tmp_path):
    from llava.train.reference import load_reference_logps

    cache = tmp_path / "ref_logps.json"
    cache.write_text('{"reference": "x", "logps": {"a": [-1.0, ')
    with pytest.raises(FileFormatError, match=f"{cache}: not a readable reference log-prob cache"):
        load_reference_logps(cache, ["a"])
    cache.write_text(json.dumps({"reference": "x", "logps": {"a": -1.0}}))
    with pytest.raises(FileFormatError, match=f"{cache}: .*no 'logps' of \\[chosen, rejected\\] pairs"):
        load_reference_logps(cache, ["a"])


def test_a_truncated_checkpoint_is_refused_naming_the_file(tmp_path, tiny_dir):
    from llava.model.builder import ModelConfig, build_model, save_model
    from llava.model.model_dirs import require_llava_checkpoint
    from llava.train.checkpoints import last_complete_checkpoint

    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "siglip"))
    )
    checkpoint = tmp_path / "checkpoint-2"
    save_model(model, tokenizer, processor, checkpoint)
    (checkpoint / "trainer_state.json").write_text("{}")
    assert last_complete_checkpoint(tmp_path) == str(checkpoint)
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match=f"--model_name_or_path {checkpoint}: {weights}: .*truncated"):
        require_llava_checkpoint(checkpoint)
    assert last_complete_checkpoint(tmp_path) is None, "auto-resume skips it"


def test_analysis_results_and_run_files_name_themselves(tmp_path):
    from analysis.gradcam_metrics import read_gradcam_rows
    from analysis.summary import training_section

    results = tmp_path / "gradcam.json"
    results.write_text('{"kind": "gradcam", "rows": [')
    with pytest.raises(FileFormatError, match=f"{results}: not a readable gradcam results file"):
        read_gradcam_rows([results])
    run = tmp_path / "runs" / "sft"
    run.mkdir(parents=True)
    (run / "trainer_state.json").write_text("{")
    with pytest.raises(FileFormatError, match=f"{run / 'trainer_state.json'}: not a readable trainer state"):
        training_section(tmp_path / "runs")


def test_a_corrupt_export_description_names_itself(tmp_path):
    from analysis.features import read_encoder_spec

    (tmp_path / "export.json").write_text("{'format_version': 1}")
    with pytest.raises(
        FileFormatError, match=f"{tmp_path / 'export.json'}: not a readable export description"
    ):
        read_encoder_spec(tmp_path)


def test_a_corrupt_deepspeed_config_names_itself(tmp_path):
    from llava.train.train import zero_stage

    config = tmp_path / "zero3.json"
    config.write_text('{"zero_optimization": {"stage": 3,}}')
    with pytest.raises(FileFormatError, match=f"{config}: not a readable DeepSpeed config"):
        zero_stage(str(config))
