"""GRPO across processes and under ZeRO-3 (issue 16), on CPU: gloo, tiny presets, the synthetic prompts.

- 2 processes generate on every rank, each from its own sampling seed (saved per rank in checkpoints),
  and log the matched sampler's ids of both ranks per step.
- ZeRO-3 (DeepSpeed's CPU accelerator, one process): generation gathers the partitioned weights; the
  first step samples, rewards and updates exactly as a plain run does.
"""

from __future__ import annotations

import json

import pytest
import torch
import train_fixtures
from test_distributed import HAS_DEEPSPEED, checkpoint, from_checkpoint, log_history, torchrun, zero3_argv
from test_grpo_trainer import GRPO_FLAGS, grpo_json
from train_fixtures import run_main, train_argv

from llava.train.grpo_step import COMPLETIONS_FILE
from llava.train.sampling import read_sample_order

train_data = train_fixtures.train_data
__all__ = ["checkpoint"]  # the tiny MLLM saved once per module (a fixture)

pytestmark = pytest.mark.slow


def test_two_processes_generate_on_every_rank_with_distinct_seeds(train_data, tmp_path):
    out = tmp_path / "grpo"
    flags = {**GRPO_FLAGS, "data_path": grpo_json(train_data, tmp_path / "data"), "max_steps": 2}
    flags.update(save_strategy="steps", save_steps=2, export_encoder=False)
    torchrun([*train_argv(train_data, out, "grpo", **flags), "--ddp_backend=gloo"], nproc=2)
    order = read_sample_order(out)
    assert [len(row["ids"]) for row in order] == [4, 4], "2 prompts per rank per step"
    states = [
        torch.load(out / "checkpoint-2" / f"generation_rng_{rank}.pth", weights_only=True) for rank in (0, 1)
    ]
    assert states[0]["seed"] != states[1]["seed"]
    assert not torch.equal(states[0]["cpu"], states[1]["cpu"])
    assert all("reward" in row for row in log_history(out) if "loss" in row)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (GPU extra)")
def test_zero3_generation_gathers_the_weights_and_matches_a_plain_run(train_data, checkpoint, tmp_path):
    flags = {**GRPO_FLAGS, "data_path": grpo_json(train_data, tmp_path / "data"), "max_steps": 2}
    zero, plain = tmp_path / "zero3", tmp_path / "plain"
    torchrun(from_checkpoint(zero3_argv(train_data, zero, "grpo", cpu=True, **flags), checkpoint), nproc=1)
    run_main(from_checkpoint(train_argv(train_data, plain, "grpo", **flags), checkpoint))

    def first_step(directory):
        rows = [json.loads(line) for line in (directory / COMPLETIONS_FILE).read_text().splitlines()]
        return [row for row in rows if row["step"] == 1]

    assert first_step(zero) == first_step(plain), "the same completions from the gathered weights"
    zero_log, plain_log = log_history(zero)[0], log_history(plain)[0]
    for key in ("reward", "loss", "grad_norm", "completions/mean_length"):
        assert zero_log[key] == pytest.approx(plain_log[key], rel=1e-4, abs=1e-4), key
