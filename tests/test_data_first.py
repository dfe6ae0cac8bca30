"""The data is answered before any model is built (issue 15): a kind that does not fit --loss_type, an invalid
record without --skip_invalid, and a --skip_invalid that leaves less than one optimizer step stop the run
from the model's tokenizer, image processor and config alone; no weights are read and a fresh OUTPUT_DIR is
left as it was. The data view (llava.train.train `data_view`) gives what the built model gives."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import train_fixtures
from test_grpo_trainer import GRPO_FLAGS
from train_fixtures import run_main, train_argv

import llava.train.train as train_module
from llava.data.errors import RecordError
from llava.export import SOURCE_EXPORT_DIR
from llava.model.builder import ModelConfig, build_model, load_model, save_model
from llava.model.image_tokens import image_token_counter
from llava.train.args import ModelArguments

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache

SIZES = [(24, 24), (30, 50), (97, 13), (400, 300)]


@pytest.fixture
def no_model(monkeypatch):
    """Every way train.py builds or loads a model raises; returns the list of attempts."""
    attempts: list[str] = []

    def refuse(name):
        def builder(*args, **kwargs):
            attempts.append(name)
            raise AssertionError(f"{name} called before the data was answered")

        return builder

    for name in ("build_model", "load_model", "build_stage3_model"):
        monkeypatch.setattr(train_module, name, refuse(name))
    return attempts


def _grpo_data(train_data, path):
    prompts = [
        {"id": r["id"], "image": r["image"], "prompt": r["prompt"], "answer": "red"}
        for r in train_data.records("dpo")
    ]
    path.write_text(json.dumps(prompts))
    return path


def test_a_dpo_run_on_sft_data_stops_before_the_model(train_data, tmp_path, no_model):
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="--loss_type dpo needs preference records"):
        run_main(train_argv(train_data, out, "dpo", data_path=train_data.sft_json))
    assert no_model == [] and not out.exists()


def test_a_grpo_run_on_preference_data_stops_before_the_model(train_data, tmp_path, no_model):
    out = tmp_path / "out"
    with pytest.raises(
        ValueError, match="--loss_type grpo with .*preference records: GRPO reads prompt records"
    ):
        run_main(train_argv(train_data, out, "grpo", **GRPO_FLAGS, data_path=train_data.dpo_json))
    assert no_model == [] and not out.exists()


def test_an_sft_run_on_grpo_prompts_stops_before_the_model(train_data, tmp_path, no_model):
    out = tmp_path / "out"
    data = _grpo_data(train_data, tmp_path / "grpo.json")
    with pytest.raises(ValueError, match="--loss_type sft with .*prompt records"):
        run_main(train_argv(train_data, out, "sft", data_path=data))
    assert no_model == [] and not out.exists()


def test_an_invalid_record_stops_before_the_model(train_data, tmp_path, no_model):
    records = train_data.records("sft")
    records[2] = {**records[2], "image": "no/such/image.png"}
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(records))
    out = tmp_path / "out"
    with pytest.raises(
        RecordError, match=f"(?s)1 invalid record.*{records[2]['id']}.*Fix them or pass --skip_invalid"
    ):
        run_main(train_argv(train_data, out, "sft", data_path=data))
    assert no_model == [] and not out.exists()


def test_a_skip_invalid_run_left_without_data_stops_before_the_model(train_data, tmp_path, no_model):
    empty = tmp_path / "empty_images"  # exists (the preflight checks that), holds none of the images
    empty.mkdir()
    out = tmp_path / "out"
    with pytest.raises(RecordError, match="--skip_invalid leaves 0 valid record"):
        run_main(train_argv(train_data, out, "sft", image_folder=empty, skip_invalid=True))
    assert no_model == [] and not out.exists()


def test_a_data_failure_leaves_an_existing_fresh_output_dir_empty(train_data, tmp_path, no_model):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="needs preference records"):
        run_main(train_argv(train_data, out, "ipo", data_path=train_data.sft_json))
    assert no_model == [] and list(out.iterdir()) == []


def _same_view(view, built) -> None:
    (config, tokenizer, processor), (model, built_tokenizer, built_processor) = view, built
    generation = {"use_cache"}  # load_model switches the KV cache off for training; not a data setting
    assert {k: v for k, v in config.to_dict().items() if k not in generation} == {
        k: v for k, v in model.config.to_dict().items() if k not in generation
    }
    counter, built_counter = image_token_counter(config), image_token_counter(model.config)
    assert [counter(h, w) for h, w in SIZES] == [built_counter(h, w) for h, w in SIZES]
    assert tokenizer.get_vocab() == built_tokenizer.get_vocab()
    assert tokenizer.chat_template == built_tokenizer.chat_template
    assert processor.to_dict() == built_processor.to_dict()


@pytest.mark.parametrize("aspect", ["square", "anyres_max_9"])
def test_the_data_view_of_a_built_model_is_the_built_models(train_data, aspect):
    args = ModelArguments(
        llm=str(train_data.llm), vision_tower=str(train_data.vision_tower), image_aspect_ratio=aspect
    )
    view = train_module.data_view(args, "float32")
    _same_view(view, train_module.load_or_build_model(args, "float32"))


def test_the_data_view_of_a_checkpoint_reads_its_files(train_data, tmp_path):
    out = tmp_path / "ckpt"
    run_main(train_argv(train_data, out, "sft", max_steps=1))
    args = ModelArguments(model_name_or_path=str(out))
    _same_view(train_module.data_view(args, "float32"), load_model(out, "float32"))


def _stage3_argv(train_data, out, source, loss_type="sft", **flags) -> list[str]:
    argv = train_argv(train_data, out, loss_type, stage3_source=source, **flags)
    return [arg for arg in argv if not arg.startswith("--vision_tower=")]


@pytest.fixture
def stage2_checkpoint(train_data, tmp_path):
    """A Stage-2-like checkpoint (not an export) to give as --stage3_source."""
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(train_data.llm), vision_tower=str(train_data.vision_tower))
    )
    save_model(model, tokenizer, processor, tmp_path / "stage2")
    return tmp_path / "stage2"


def test_a_stage3_run_from_a_checkpoint_source_refused_by_its_data_leaves_no_export(
    train_data, tmp_path, stage2_checkpoint, no_model
):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match="needs preference records"):
        run_main(_stage3_argv(train_data, out, stage2_checkpoint, "dpo", data_path=train_data.sft_json))
    assert no_model == [] and list(out.iterdir()) == []


def test_a_stage3_run_from_a_checkpoint_source_moves_its_staged_export_into_output_dir(
    train_data, tmp_path, stage2_checkpoint
):
    out = tmp_path / "out"
    trainer = run_main(
        _stage3_argv(train_data, out, stage2_checkpoint, max_steps=1, mm_tunable_parts="mm_mlp_adapter")
    )
    export = out / SOURCE_EXPORT_DIR
    assert (export / "export.json").exists()
    assert not list(out.glob(".*staging*"))
    assert Path(trainer.model.config.vision_config._name_or_path).parent == export
