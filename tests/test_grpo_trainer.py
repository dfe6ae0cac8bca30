"""GRPO inside the one Stage-2 trainer (issue 16): matched prompts, the image encoded once per group
(loss and gradients equal to the per-completion path), on-policy ratio 1, image-token suppression,
the sampling RNG (per rank, resumable), GRPO records and the learning test on the synthetic world.

Runs use the tiny presets and the synthetic world's MMPR prompts (tests/train_fixtures.py), whose
GRPO json the real converter writes next to the DPO json.
"""

from __future__ import annotations

import json
import statistics

import pytest
import torch
import train_fixtures
from train_fixtures import max_abs_diff, run_main, train_argv, weights

from llava.train.generation import GenerationRNG, HFGenerationBackend, SamplingConfig, VLLMGenerationBackend
from llava.train.grpo_step import COMPLETIONS_FILE, StepRepeatSampler
from llava.train.logps import embed_with_images, encode_images
from llava.train.sampling import read_sample_order

train_data = train_fixtures.train_data

GRPO_FLAGS = {"num_generations": 4, "max_completion_length": 8, "beta": 0.0}


def grpo_json(data, out_dir, ids=None):
    """The converter's GRPO records of `ids` (default: the DPO json's), in the DPO json's order."""
    records = {r["id"]: r for r in json.loads((data.world.parent / "mmpr_grpo.json").read_text())}
    path = out_dir / "grpo.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps([records[i] for i in (ids or data.ids)]))
    return path


def grpo_argv(data, tmp_path, output_dir, **flags):
    settings = {**GRPO_FLAGS, "data_path": grpo_json(data, tmp_path / "grpo_data"), **flags}
    return train_argv(data, output_dir, "grpo", **settings)


def grpo_trainer(data, tmp_path, **flags):
    """A GRPO `PivotTrainer` built as the entry point builds it (no training started)."""
    from transformers import HfArgumentParser

    from llava.data.collator import PromptCollator
    from llava.train.args import DataArguments, ModelArguments, PivotTrainingArguments
    from llava.train.train import build_dataset, load_or_build_model
    from llava.train.trainer import PivotTrainer

    argv = grpo_argv(data, tmp_path, tmp_path / "out", **flags)
    parser = HfArgumentParser((ModelArguments, DataArguments, PivotTrainingArguments))
    model_args, data_args, train_args = parser.parse_args_into_dataclasses(args=argv)
    torch.manual_seed(0)
    model, tokenizer, image_processor = load_or_build_model(model_args, train_args.weights_dtype)
    dataset = build_dataset(data_args, train_args, tokenizer, image_processor, model.config)
    return PivotTrainer(
        model=model,
        args=train_args,
        train_dataset=dataset,
        data_collator=PromptCollator(),
        processing_class=tokenizer,
    )


def prepared_batch(trainer, n: int = 2):
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(n)])
    batches, num_items = trainer.grpo.prepare([batch], global_step=0)
    return batches[0], num_items


def loss_and_grads(trainer, batch, num_items):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    model.train()
    loss = trainer.grpo.loss(model, batch, num_items)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


# ---- matched prompts ------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_and_dpo_runs_log_identical_prompt_ids_in_identical_order(train_data, tmp_path):
    settings = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": 3}
    data = train_data.subset(8, tmp_path / "data")
    run_main(train_argv(data, tmp_path / "dpo", "dpo", **settings))
    run_main(grpo_argv(data, tmp_path, tmp_path / "grpo", **settings))
    dpo, grpo = read_sample_order(tmp_path / "dpo"), read_sample_order(tmp_path / "grpo")
    assert len(dpo) == 3 and all(len(row["ids"]) == 4 for row in dpo)
    assert grpo == dpo
    table = [json.loads(line) for line in (tmp_path / "grpo" / COMPLETIONS_FILE).read_text().splitlines()]
    assert [row["step"] for row in table] == [
        s for s in (1, 2, 3) for _ in range(GRPO_FLAGS["num_generations"])
    ]
    assert all(row["id"] == dpo[row["step"] - 1]["ids"][0] for row in table), "the step's first group"


def test_step_repeat_sampler_yields_each_step_block_mu_times():
    sampler = StepRepeatSampler(list(range(5)), block=2, repeats=3)
    assert list(sampler) == [0, 1, 0, 1, 0, 1, 2, 3, 2, 3, 2, 3, 4, 4, 4]
    assert len(sampler) == 15


def test_num_iterations_reuses_one_generation_for_mu_steps(train_data, tmp_path):
    out = tmp_path / "mu"
    run_main(grpo_argv(train_data, tmp_path, out, num_iterations=2, max_steps=4, export_encoder=False))
    order = [row["ids"] for row in read_sample_order(out)]
    assert order[0] == order[1] and order[2] == order[3] and order[0] != order[2]
    table = [json.loads(line) for line in (out / COMPLETIONS_FILE).read_text().splitlines()]
    assert sorted({row["step"] for row in table}) == [1, 3], "one generation per two optimizer steps"


# ---- the image encoded once per group -------------------------------------------------------------


def _count_tower_calls(model):
    calls = [0]
    handle = model.model.vision_tower.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls, handle


@pytest.mark.parametrize(
    "flags",
    [
        {"loss_normalization": "dapo"},
        {"loss_normalization": "grpo", "beta": 0.5},
        {"loss_normalization": "dr_grpo", "num_iterations": 2, "beta": 0.1},
    ],
)
def test_shared_image_encoding_equals_the_per_completion_path(train_data, tmp_path, flags):
    trainer = grpo_trainer(train_data, tmp_path, **flags)
    calls, handle = _count_tower_calls(trainer.model)
    try:
        batch, num_items = prepared_batch(trainer)
        generation_calls = calls[0]
        # A reference and old policy that differ from the policy, so KL and the ratio bite.
        mb = batch["grpo"]
        if mb.old_logps is not None:
            mb.old_logps = mb.old_logps + 0.3 * torch.randn_like(mb.old_logps)
        if mb.ref_logps is not None:
            mb.ref_logps = mb.ref_logps - 0.5
        mb.advantages = torch.linspace(-1.0, 1.0, mb.advantages.numel())
        calls[0] = 0
        trainer.args.share_image_encoding = True
        shared_loss, shared = loss_and_grads(trainer, batch, num_items)
        shared_calls, calls[0] = calls[0], 0
        trainer.args.share_image_encoding = False
        separate_loss, separate = loss_and_grads(trainer, batch, num_items)
        separate_calls = calls[0]
    finally:
        handle.remove()
    expected_generation = 2 if flags.get("num_iterations", 1) > 1 else 1  # + the old policy's scoring
    assert generation_calls == expected_generation, "one encoding for the whole group's generation"
    assert shared_calls == 1 and separate_calls == 1, "one batched tower call per path"
    torch.testing.assert_close(shared_loss, separate_loss, rtol=1e-5, atol=1e-6)
    assert shared.keys() == separate.keys()
    assert any(".vision_tower." in name for name in shared), "the tower must receive gradients"
    for name in shared:
        torch.testing.assert_close(shared[name], separate[name], rtol=1e-4, atol=1e-6, msg=name)
    tower = sum(float(g.norm()) for n, g in shared.items() if ".vision_tower." in n)
    assert tower > 0


def test_reference_encodes_each_image_once(train_data, tmp_path):
    trainer = grpo_trainer(train_data, tmp_path, beta=0.1)
    calls, handle = _count_tower_calls(trainer.grpo.ref_model)
    try:
        prepared_batch(trainer)
    finally:
        handle.remove()
    assert calls[0] == 1


# ---- on-policy first iteration ---------------------------------------------------------------------


@pytest.mark.parametrize("num_iterations", [1, 2])
def test_on_policy_first_iteration_has_ratio_one(train_data, tmp_path, num_iterations):
    """π_old = πθ at the first iteration: the clipped and the unclipped surrogate give the same gradient."""
    trainer = grpo_trainer(train_data, tmp_path, num_iterations=num_iterations, epsilon=1e-8)
    batch, num_items = prepared_batch(trainer)
    mb = batch["grpo"]
    mb.advantages = torch.linspace(-1.0, 1.0, mb.advantages.numel())
    if num_iterations > 1:
        with torch.no_grad():
            rows = trainer.grpo._row_features(trainer.model, mb)
            current = trainer.grpo._logps(trainer.model, mb, rows, mb.completions.ids.shape[1])
        torch.testing.assert_close(mb.old_logps, current, rtol=0, atol=1e-6)
    tight_loss, tight = loss_and_grads(trainer, batch, num_items)
    trainer.grpo.config.epsilon = 1e8
    loose_loss, loose = loss_and_grads(trainer, batch, num_items)
    torch.testing.assert_close(tight_loss, loose_loss)
    for name in tight:
        torch.testing.assert_close(tight[name], loose[name], rtol=1e-5, atol=1e-7, msg=name)
    assert trainer._metrics["clip_ratio"] and max(trainer._metrics["clip_ratio"]) == 0.0


# ---- generation --------------------------------------------------------------------------------------


def test_generation_never_samples_the_image_token(train_data, tmp_path):
    trainer = grpo_trainer(train_data, tmp_path)
    model = trainer.model
    image_id = model.config.image_token_id
    bias = torch.zeros(model.lm_head.out_features)
    bias[image_id] = 1e4  # the image token would be sampled every time
    model.lm_head.bias = torch.nn.Parameter(bias, requires_grad=False)
    item = trainer.train_dataset[0]
    with torch.no_grad():
        features = encode_images(model, item["pixel_values"], item["image_sizes"])
        embeds = embed_with_images(model, item["input_ids"][None], features)
        logits = model(inputs_embeds=embeds).logits
    assert int(logits[0, -1].argmax()) == image_id, "the test must bite: the image token dominates"
    backend = trainer.grpo.backend
    assert isinstance(backend, HFGenerationBackend)
    completions = backend.generate(model, [item["input_ids"]], features, SamplingConfig(4, 6))
    assert completions.ids.shape == (4, 6)
    assert not (completions.ids == image_id).any()


def test_sampling_rng_is_distinct_per_rank_and_restores(tmp_path):
    first, second = GenerationRNG(0, 0, "cpu"), GenerationRNG(0, 1, "cpu")
    with first.active():
        a = torch.rand(4)
    with second.active():
        b = torch.rand(4)
    assert not torch.equal(a, b), "processes must sample different completions"
    before = torch.get_rng_state()
    first.save(tmp_path)
    with first.active():
        c = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before), "the training RNG is untouched"
    again = GenerationRNG(123, 0, "cpu")
    again.load(tmp_path)
    with again.active():
        assert torch.equal(torch.rand(4), c)
    with pytest.raises(FileNotFoundError, match="sampling RNG"):
        GenerationRNG(0, 3, "cpu").load(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_vllm_backend_refuses_without_cuda():
    with pytest.raises(RuntimeError, match="needs CUDA"):
        VLLMGenerationBackend(0, [1])


# ---- resume --------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_resumed_grpo_run_equals_uninterrupted_run(train_data, tmp_path):
    flags = {
        "max_steps": 4,
        "gradient_accumulation_steps": 2,
        "save_strategy": "steps",
        "save_steps": 2,
        "lr_scheduler_type": "constant",
        "export_encoder": False,
    }
    full = run_main(grpo_argv(train_data, tmp_path, tmp_path / "full", **flags))
    first = run_main(grpo_argv(train_data, tmp_path, tmp_path / "part", **{**flags, "max_steps": 2}))
    assert (tmp_path / "part" / "checkpoint-2" / "generation_rng_0.pth").is_file()
    halfway = weights(first.model)
    resumed = run_main(grpo_argv(train_data, tmp_path, tmp_path / "part", **flags))
    assert resumed.state.global_step == 4

    def table(name):
        rows = [json.loads(line) for line in (tmp_path / name / COMPLETIONS_FILE).read_text().splitlines()]
        return [row for row in rows if row["step"] > 2]

    assert table("part") == table("full"), "the resumed run samples the same completions"
    final = weights(resumed.model)
    assert max_abs_diff(final, halfway) > 1e-4, "steps 3-4 must change the weights"
    torch.testing.assert_close(final, weights(full.model), rtol=1e-5, atol=1e-6)


# ---- records ------------------------------------------------------------------------------------------


def test_grpo_record_without_answer_is_refused_or_skipped(train_data, tmp_path):
    from llava.data.errors import RecordError

    path = grpo_json(train_data, tmp_path / "bad")
    records = json.loads(path.read_text())
    victim = records[1]["id"]
    del records[1]["answer"]
    path.write_text(json.dumps(records))
    with pytest.raises(RecordError, match=f"{victim}.*missing key 'answer'"):
        run_main(train_argv(train_data, tmp_path / "out", "grpo", **GRPO_FLAGS, data_path=path))
    trainer = run_main(
        train_argv(
            train_data,
            tmp_path / "skip",
            "grpo",
            **GRPO_FLAGS,
            data_path=path,
            skip_invalid=True,
            max_steps=1,
        )
    )
    assert victim not in trainer.train_dataset.ids
    skipped = [
        json.loads(line) for line in (tmp_path / "skip" / "skipped_records.jsonl").read_text().splitlines()
    ]
    assert [row["id"] for row in skipped] == [victim]


def test_grpo_refuses_preference_data_and_dpo_refuses_prompts(train_data, tmp_path):
    with pytest.raises(ValueError, match="GRPO reads prompt records"):
        run_main(train_argv(train_data, tmp_path / "a", "grpo", **GRPO_FLAGS))
    with pytest.raises(ValueError, match="needs preference records"):
        run_main(train_argv(train_data, tmp_path / "b", "dpo", data_path=grpo_json(train_data, tmp_path)))


# ---- learning -------------------------------------------------------------------------------------------

LEARN_STEPS = 30
LEARN_WINDOW = 5
LEARN_MARGIN = 0.25  # measured rises 0.550, 0.475, 0.506 (seeds 0, 1, 2; mean 0.51, sd 0.04)


@pytest.mark.slow
def test_grpo_raises_the_mean_training_reward(train_data, tmp_path):
    """The tiny policy learns the format reward (stop within five words on one line) from its samples.

    Mean reward of the first vs the last LEARN_WINDOW logged steps of a LEARN_STEPS-step run, seed 0.
    """
    argv = grpo_argv(
        train_data,
        tmp_path,
        tmp_path / "learn",
        reward_funcs="format",
        num_generations=8,
        max_completion_length=12,
        per_device_train_batch_size=4,
        max_steps=LEARN_STEPS,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        export_encoder=False,
    )
    trainer = run_main(argv)
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    assert len(rewards) == LEARN_STEPS
    first = statistics.mean(rewards[:LEARN_WINDOW])
    last = statistics.mean(rewards[-LEARN_WINDOW:])
    assert last > first + LEARN_MARGIN, (first, last, rewards)


# ---- the launch script ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_grpo_script_trains_from_a_stage1_checkpoint_and_exports_the_encoder(train_data, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from llava.model.builder import ModelConfig, build_model, save_model

    stage1 = tmp_path / "stage1"
    save_model(
        *build_model(ModelConfig(llm=str(train_data.llm), vision_tower=str(train_data.vision_tower))), stage1
    )
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "CKPT_PATH": str(stage1),
        "DATA_PATH": str(grpo_json(train_data, tmp_path / "data")),
        "IMAGE_FOLDER": str(train_data.world),
        "OUTPUT_DIR": str(tmp_path / "grpo"),
        "GLOBAL_BATCH": "4",
        "PER_DEVICE_BATCH": "2",
        "NUM_GENERATIONS": "4",
        "MAX_COMPLETION_LENGTH": "8",
        "WORKERS": "0",
        "SAVE_STEPS": "2",
    }
    script = Path(__file__).resolve().parents[1] / "scripts" / "train" / "grpo.sh"
    result = subprocess.run(
        ["bash", str(script), "--max_steps", "2"], env=env, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = tmp_path / "grpo"
    assert json.loads((out / "config.json").read_text())["pivot_loss_type"] == "grpo"
    assert json.loads((out / "export.json").read_text())["loss_type"] == "grpo"
    assert (out / "vision_encoder").is_dir() and (out / "checkpoint-2" / "vision_encoder").is_dir()
    assert [row["step"] for row in read_sample_order(out)] == [1, 2]
    assert (out / COMPLETIONS_FILE).is_file()


# ---- options ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "match"),
    [
        ({"eval_strategy": "steps"}, "no evaluation loss"),
        ({"gamma": 1.0}, "grpo run has neither"),
        ({"reward_weights": [1.0]}, "1 values for 2"),
        ({"num_iterations": 2, "save_strategy": "steps", "save_steps": 3}, "multiple of --num_iterations"),
        ({"loss_normalization": "bnpo"}, "choose one of"),
        ({"beta": -0.1}, "beta"),
    ],
)
def test_grpo_options_fail_fast(tmp_path, flags, match):
    from llava.train.args import PivotTrainingArguments

    with pytest.raises(ValueError, match=match):
        PivotTrainingArguments(output_dir=str(tmp_path), loss_type="grpo", use_cpu=True, **flags)
    PivotTrainingArguments(output_dir=str(tmp_path), loss_type="grpo", use_cpu=True, beta=0.0)
