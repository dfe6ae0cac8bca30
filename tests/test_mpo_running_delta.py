"""MPO's BCO shift δ as InternVL's MPO keeps it: TRL 0.10's RunningMoments mean, saved for exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import train_fixtures
from train_fixtures import make_trainer, max_abs_diff, run_main, train_argv, weights

from llava.train.losses import LossConfig, batch_reward_mean, mpo_loss
from llava.train.running_moments import FILENAME, RunningMoments

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache
RESUME_FLAGS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "save_strategy": "steps",
    "save_steps": 2,
    "lr_scheduler_type": "constant",  # the same LR at steps 3-4 whether max_steps is 2 or 4
    "reference": "live",
}


def test_running_moments_merge_matches_the_moments_of_the_whole_stream():
    values = [
        torch.tensor([0.3]),
        torch.tensor([-1.2, 0.5]),
        torch.tensor([2.0]),
        torch.tensor([0.1, 0.1, 4.0]),
    ]
    moments = RunningMoments()
    for chunk in values:
        moments.update(chunk)
    stream = torch.cat(values).double()
    assert moments.count == pytest.approx(len(stream))
    assert moments.mean == pytest.approx(stream.mean().item(), abs=1e-12)
    assert moments.var == pytest.approx(stream.var(unbiased=False).item(), abs=1e-12)
    assert moments.std == pytest.approx(stream.std(unbiased=True).item(), abs=1e-12)


def test_first_update_takes_the_first_batch_mean():
    moments = RunningMoments()
    moments.update(torch.tensor([0.7], dtype=torch.float64))
    assert moments.mean == pytest.approx(0.7, abs=1e-12)


def test_running_moments_round_trip_and_name_a_bad_file(tmp_path):
    moments = RunningMoments()
    moments.update(torch.tensor([1.5, -0.5]))
    moments.save(tmp_path)
    assert RunningMoments.load(tmp_path) == moments
    (tmp_path / FILENAME).write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / FILENAME)):
        RunningMoments.load(tmp_path)


def test_trainer_subtracts_the_running_mean_of_micro_batch_rewards(train_data, tmp_path):
    trainer = make_trainer(train_data, tmp_path, loss_type="mpo")
    model = trainer.model
    cfg = LossConfig(beta=trainer.args.beta, mpo_weights=trainer.args.mpo_weight_tuple)
    means, losses = [], []
    for start in (0, 2, 4):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + 2)])
        with torch.no_grad():
            stats = trainer._pair_stats(model, dict(batch), batch["sample_ids"])
            model.train()
            losses.append(trainer.compute_loss(model, dict(batch)))
        with torch.no_grad():  # perturb the policy so the micro-batch rewards differ from zero
            for param in model.parameters():
                param.add_(0.01 * torch.randn_like(param))
        means.append(batch_reward_mean(stats, cfg).item())
        expected_delta = sum(means) / len(means)
        assert trainer.bco_moments.mean == pytest.approx(expected_delta, abs=1e-6)
        stats.bco_delta = expected_delta
        per_sample, _ = mpo_loss(stats, cfg)
        torch.testing.assert_close(
            losses[-1], per_sample.mean() / trainer.current_gradient_accumulation_steps
        )
    assert len({round(m, 6) for m in means}) == 3, "the batches must have different mean rewards"


def test_batch_option_uses_the_micro_batch_mean(train_data, tmp_path):
    trainer = make_trainer(train_data, tmp_path, loss_type="mpo", bco_delta="batch")
    assert trainer.bco_moments is None


@pytest.mark.slow
def test_mpo_resume_equals_uninterrupted_run(train_data, tmp_path):
    flags = {**RESUME_FLAGS, "learning_rate": 1e-2}
    full = run_main(train_argv(train_data, tmp_path / "full", "mpo", max_steps=4, **flags))
    out = tmp_path / "resumed"
    first = run_main(train_argv(train_data, out, "mpo", max_steps=2, **flags))
    saved = json.loads((out / "checkpoint-2" / FILENAME).read_text())
    assert saved["count"] == pytest.approx(first.bco_moments.count) and saved["count"] == pytest.approx(4)
    resumed = run_main(train_argv(train_data, out, "mpo", max_steps=4, **flags))
    assert resumed.bco_moments.count == pytest.approx(full.bco_moments.count)
    assert resumed.bco_moments.mean == pytest.approx(full.bco_moments.mean, abs=1e-9)
    assert max_abs_diff(weights(resumed.model), weights(first.model)) > 1e-5
    torch.testing.assert_close(weights(resumed.model), weights(full.model), rtol=1e-5, atol=1e-6)
