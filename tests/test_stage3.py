"""Stage 3, PIVOT evaluation (llava.model.stage3): transplanted frozen encoder, reused projector layers.

References are independent of the Stage-3 code: the Stage-2 checkpoint's own tower and projector
(loaded with llava.model.builder), the new LLM's weights as written to disk, and the initial Stage-3
model rebuilt under the same seed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from stage_fixtures import exported_tokens, mllm_tokens, train, write_world

from llava.export import SOURCE_EXPORT_DIR, export_checkpoint, read_export, resolve_source
from llava.model.builder import ModelConfig, build_model, load_model, save_model
from llava.model.stage3 import (
    Stage3Config,
    build_stage3_model,
    freeze_stage3,
    load_stage3_model,
)
from llava.tiny import write_llm
from llava.train.args import ModelArguments

EXPECTED_DIMS = {
    0: [[32, 48], [48, 48]],
    1: [[32, 64], [64, 48]],
    2: [[32, 64], [64, 64], [64, 48]],
}


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    """A Stage-2-like checkpoint (tiny LLM of width 64 + SigLIP), a new LLM of width 48 and a world."""
    root = tmp_path_factory.mktemp("stage3")
    torch.manual_seed(0)
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "siglip"))
    )
    save_model(model, tokenizer, processor, root / "stage2")
    write_llm(root / "llm48", seed=1, hidden=48)
    return {"root": root, "stage2": root / "stage2", "llm48": root / "llm48", "world": write_world(root)}


def _stage3(source: str, llm: str, *rest) -> tuple[Stage3Config, Path]:
    """(Stage3Config(source, llm, *options), the source's export dir) for `*options, work_dir = rest`."""
    *options, work_dir = rest
    return Stage3Config(source, llm, *options), resolve_source(source, work_dir)


def _stage2_parts(stage2):
    model, _, _ = load_model(stage2)
    return model.model.vision_tower.state_dict(), model.model.multi_modal_projector.state_dict()


def _assert_equal_states(actual: dict, expected: dict, what: str) -> None:
    assert actual.keys() == expected.keys(), what
    changed = [k for k in expected if not torch.equal(actual[k], expected[k])]
    assert not changed, f"{what}: {changed}"


@pytest.mark.parametrize("reuse", [0, 1, 2])
def test_stage3_trains_only_new_layers_and_keeps_the_reused_ones(setup, reuse, tmp_path):
    world, stage2, llm48 = setup["world"], setup["stage2"], setup["llm48"]
    proj_dir, full_dir = tmp_path / "proj", tmp_path / "full"
    common = ["--image_folder", str(world), "--max_steps", "2", "--save_strategy", "no"]
    step1 = train([
        "--stage3_source", str(stage2), "--llm", str(llm48), "--projector_reuse_layers", str(reuse),
        "--data_path", str(world / "llava" / "pretrain.json"), "--conv_template", "plain",
        "--mm_tunable_parts", "mm_mlp_adapter", "--learning_rate", "1e-2", "--output_dir", str(proj_dir), *common,
    ]).model  # fmt: skip
    tower2, projector2 = _stage2_parts(stage2)
    fresh_llm = transformers.AutoModelForCausalLM.from_pretrained(llm48)
    transformers.set_seed(0)  # the seed run() used before building: the same initial Stage-3 model
    initial, _, _ = build_stage3_model(*_stage3(str(stage2), str(llm48), reuse, tmp_path / "rebuild"))

    assert step1.config.pivot_projector_dims == EXPECTED_DIMS[reuse]
    projector = step1.model.multi_modal_projector.state_dict()
    reused = {k: v for k, v in projector.items() if int(k.split(".")[0][-1]) <= reuse}
    new = [k for k in projector if k not in reused]
    _assert_equal_states(reused, {k: projector2[k] for k in reused}, "reused Stage-2 layers")
    _assert_equal_states(step1.model.vision_tower.state_dict(), tower2, "encoder")
    _assert_equal_states(step1.model.language_model.state_dict(), fresh_llm.model.state_dict(), "LLM")
    assert torch.equal(step1.lm_head.weight, fresh_llm.lm_head.weight)
    initial_projector = initial.model.multi_modal_projector.state_dict()
    assert all(not torch.equal(projector[k], initial_projector[k]) for k in new), "new layers must train"

    step2 = train([
        "--model_name_or_path", str(proj_dir), "--data_path", str(world / "llava" / "instruct.json"),
        "--conv_template", "qwen_1_5", "--mm_tunable_parts", "mm_mlp_adapter,mm_language_model",
        "--learning_rate", "1e-3", "--output_dir", str(full_dir), *common,
    ]).model  # fmt: skip
    projector_after = step2.model.multi_modal_projector.state_dict()
    _assert_equal_states(
        {k: projector_after[k] for k in reused}, {k: projector2[k] for k in reused}, "reused"
    )
    _assert_equal_states(step2.model.vision_tower.state_dict(), tower2, "encoder after step 2")
    assert all(not torch.equal(projector_after[k], projector[k]) for k in new)
    llm_after = step2.model.language_model.state_dict()
    assert any(not torch.equal(llm_after[k], v) for k, v in fresh_llm.model.state_dict().items())

    pixels = torch.randn(2, 3, 32, 32)  # the export of a Stage-3 model (reuse 2: folded) is still exact
    assert torch.allclose(
        exported_tokens(full_dir, pixels), mllm_tokens(step2.eval(), pixels), atol=1e-5, rtol=0
    )


def test_checkpoint_and_export_sources_give_the_same_encoder(setup, tmp_path):
    stage2, llm48 = setup["stage2"], setup["llm48"]
    from_checkpoint, _, _ = build_stage3_model(*_stage3(str(stage2), str(llm48), tmp_path / "a"))
    assert (tmp_path / "a" / SOURCE_EXPORT_DIR / "export.json").exists()
    export = export_checkpoint(stage2, tmp_path / "export")
    from_export, _, _ = build_stage3_model(*_stage3(str(export), str(llm48), tmp_path / "b"))
    assert not (tmp_path / "b" / SOURCE_EXPORT_DIR).exists()
    tower2, _ = _stage2_parts(stage2)
    _assert_equal_states(from_export.model.vision_tower.state_dict(), tower2, "encoder from export")
    _assert_equal_states(from_checkpoint.model.vision_tower.state_dict(), tower2, "encoder from checkpoint")
    assert from_export.config.mm_vision_select_layer == -2  # the Stage-2 index, not the export's -1
    assert not any(p.requires_grad for p in from_export.model.vision_tower.parameters())


def test_same_width_reuse_1_is_a_stock_hf_llava_checkpoint(setup, tiny_dir, tmp_path):
    model, tokenizer, processor = build_stage3_model(
        *_stage3(str(setup["stage2"]), str(tiny_dir / "llm"), tmp_path / "work")
    )
    save_model(model, tokenizer, processor, tmp_path / "ckpt")
    stock = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path / "ckpt").eval()
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.equal(mllm_tokens(stock, pixels), mllm_tokens(model.eval(), pixels))


def test_stage3_refuses_bad_settings(setup, tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="choose one of"):
        Stage3Config(str(setup["stage2"]), str(setup["llm48"]), projector_reuse_layers=3)
    with pytest.raises(ValueError, match="model_name_or_path"):
        ModelArguments(stage3_source=str(setup["stage2"]), llm="x", model_name_or_path="y")
    with pytest.raises(ValueError, match="--llm"):
        ModelArguments(stage3_source=str(setup["stage2"]))
    model, _, _ = build_stage3_model(*_stage3(str(setup["stage2"]), str(setup["llm48"]), tmp_path / "w"))
    with pytest.raises(ValueError, match="frozen"):
        freeze_stage3(model, ("mm_vision_tower", "mm_mlp_adapter"))


@pytest.mark.parametrize(
    ("tower", "select_layer"), [("dinov2", None), ("siglip+dinov2", None), ("vit", None), ("vit", -2)]
)
def test_encoder_is_transplanted_with_its_feature_point(setup, tiny_dir, tmp_path, tower, select_layer):
    """Multi-tower encoders (DINOv2 after its final norm, ensembles) and plain towers read before or after
    their final norm give the Stage-3 model the hidden state the Stage-2 model read."""
    torch.manual_seed(0)
    stage2, tokenizer, processor = build_model(
        ModelConfig(
            llm=str(tiny_dir / "llm"),
            vision_tower="+".join(str(tiny_dir / part) for part in tower.split("+")),
            mm_vision_select_layer=select_layer,
        )
    )
    save_model(stage2, tokenizer, processor, tmp_path / "stage2")
    model, _, processor3 = build_stage3_model(
        *_stage3(str(tmp_path / "stage2"), str(setup["llm48"]), tmp_path / "work")
    )
    assert model.config.vision_feature_select_strategy == stage2.config.vision_feature_select_strategy
    assert not any(p.requires_grad for p in model.model.vision_tower.parameters())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        read3 = model.eval().model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
        read2 = stage2.eval().model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1]
    assert torch.equal(read3, read2)
    count = model.config.image_seq_length
    assert count == stage2.config.image_seq_length
    ids = torch.tensor([[model.config.image_token_id] * count + [5, 6]] * 2)
    assert torch.isfinite(model(input_ids=ids, pixel_values=pixels).logits).all()


def test_feature_point_of_older_checkpoints_is_recorded_and_older_exports_refused(setup, tiny_dir, tmp_path):
    """Checkpoints written before `tie_last_hidden_states` existed were read before the final norm: the
    export records that; an export lacking the record is refused rather than re-read after the norm."""
    stage2, tokenizer, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "vit"))
    )
    save_model(stage2, tokenizer, processor, tmp_path / "stage2")
    config_file = tmp_path / "stage2" / "config.json"
    config = json.loads(config_file.read_text())
    assert config["vision_config"].pop("tie_last_hidden_states") is True
    config_file.write_text(json.dumps(config))
    export = export_checkpoint(tmp_path / "stage2", tmp_path / "export")
    encoder_config = export / "vision_encoder" / "config.json"
    recorded = json.loads(encoder_config.read_text())
    assert recorded["tie_last_hidden_states"] is False
    model, _, _ = build_stage3_model(*_stage3(str(export), str(setup["llm48"]), tmp_path / "a"))
    assert model.config.vision_config.tie_last_hidden_states is False
    del recorded["tie_last_hidden_states"]
    encoder_config.write_text(json.dumps(recorded))
    with pytest.raises(ValueError, match="Re-export the Stage-2 checkpoint"):
        build_stage3_model(*_stage3(str(export), str(setup["llm48"]), tmp_path / "b"))


@pytest.mark.slow
def test_pivot_scripts_run_both_steps(setup, tmp_path):
    world, scripts = setup["world"], Path(__file__).resolve().parents[1] / "scripts" / "train"
    env = {
        **os.environ, "PYTHON": sys.executable, "LLM_VERSION": str(setup["llm48"]), "IMAGE_FOLDER": str(world),
        "GLOBAL_BATCH": "2", "PER_DEVICE_BATCH": "2", "WORKERS": "0", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip
    steps = (
        (
            "pivot_proj.sh",
            {"STAGE2_SOURCE": str(setup["stage2"]), "REUSE_LAYERS": "2", "DATA_PATH": "pretrain.json"},
        ),
        ("pivot_full.sh", {"CKPT_PATH": str(tmp_path / "pivot_proj.sh"), "DATA_PATH": "instruct.json"}),
    )
    for script, extra in steps:
        extra = {
            **extra,
            "DATA_PATH": str(world / "llava" / extra["DATA_PATH"]),
            "OUTPUT_DIR": str(tmp_path / script),
        }
        result = subprocess.run(
            ["bash", str(scripts / script), "--max_steps", "1"],
            env={**env, **extra},
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, f"{script}:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    final, _, _ = load_stage3_model(tmp_path / "pivot_full.sh")
    assert final.config.pivot_projector_dims == EXPECTED_DIMS[2]
    _, projector2 = _stage2_parts(setup["stage2"])
    projector = final.model.multi_modal_projector.state_dict()
    _assert_equal_states(
        {k: projector[k] for k in projector2}, projector2, "reused layers after both scripts"
    )
    assert read_export(tmp_path / "pivot_full.sh")["global_step"] == 1
