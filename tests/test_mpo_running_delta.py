"""MPO's BCO shift δ as InternVL's MPO keeps it: TRL 0.10's RunningMoments mean, saved for exact resume."""

from __future__ import annotations

import json

import pytest
import torch
import train_fixtures
from train_fixtures import make_trainer, max_abs_diff, run_main, train_argv, weights

from llava.train.losses import batch_reward_mean, mpo_loss
from llava.train.running_mean import FILENAME, RunningMean

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache
RESUME_FLAGS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "save_strategy": "steps",
    "save_steps": 2,
    "lr_scheduler_type": "constant",  # the same LR at steps 3-4 whether max_steps is 2 or 4
    "reference": "live",
}


def test_running_mean_equals_the_mean_of_the_whole_stream():
    values = [
        torch.tensor([0.3]),
        torch.tensor([-1.2, 0.5]),
        torch.tensor([2.0]),
        torch.tensor([0.1, 0.1, 4.0]),
    ]
    running = RunningMean()
    for chunk in values:
        running.update(chunk)
    stream = torch.cat(values).double()
    assert running.count == len(stream)
    assert running.mean == pytest.approx(stream.mean().item(), abs=1e-12)


def test_first_update_takes_the_first_batch_mean():
    running = RunningMean()
    running.update(torch.tensor([0.7], dtype=torch.float64))
    assert running.mean == pytest.approx(0.7, abs=1e-12)


def test_running_mean_round_trips_and_names_a_bad_file(tmp_path):
    running = RunningMean()
    running.update(torch.tensor([1.5, -0.5]))
    running.save(tmp_path)
    assert RunningMean.load(tmp_path) == running
    (tmp_path / FILENAME).write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path / FILENAME)):
        RunningMean.load(tmp_path)


def _mpo_losses_over_three_batches(trainer) -> list[tuple[torch.Tensor, object, float, float | None]]:
    """Training-mode losses of three micro-batches (the policy nudged between them so their mean rewards
    differ), each with its `PairStats`, its in-batch mean reward and the trainer's running mean after it."""
    model = trainer.model
    cfg = trainer.loss_config
    out = []
    for start in (0, 2, 4):
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(start, start + 2)])
        with torch.no_grad():
            stats = trainer._pair_stats(model, dict(batch), batch["sample_ids"])
            model.train()
            loss = trainer.compute_loss(model, dict(batch))
            for param in model.parameters():
                param.add_(0.01 * torch.randn_like(param))
        running = trainer.bco_running_mean.mean if trainer.bco_running_mean is not None else None
        out.append((loss, stats, batch_reward_mean(stats, cfg).item(), running))
    assert len({round(mean, 6) for _, _, mean, _ in out}) == 3, "the batches must have different mean rewards"
    return out


def _mpo_mean_loss(stats, cfg, bco_delta: float | None, accumulation: int) -> torch.Tensor:
    stats.bco_delta = bco_delta
    return mpo_loss(stats, cfg)[0].mean() / accumulation


def test_trainer_subtracts_the_running_mean_of_micro_batch_rewards(train_data, tmp_path):
    trainer = make_trainer(train_data, tmp_path, loss_type="mpo")
    accumulation = trainer.current_gradient_accumulation_steps
    means = []
    for loss, stats, batch_mean, trainer_running in _mpo_losses_over_three_batches(trainer):
        means.append(batch_mean)
        running = sum(means) / len(means)
        assert trainer_running == pytest.approx(running, abs=1e-6)
        torch.testing.assert_close(loss, _mpo_mean_loss(stats, trainer.loss_config, running, accumulation))


def test_batch_option_subtracts_each_micro_batch_own_mean(train_data, tmp_path):
    trainer = make_trainer(train_data, tmp_path, loss_type="mpo", bco_delta="batch")
    assert trainer.bco_running_mean is None
    accumulation = trainer.current_gradient_accumulation_steps
    means = []
    for loss, stats, batch_mean, _ in _mpo_losses_over_three_batches(trainer):
        means.append(batch_mean)
        torch.testing.assert_close(loss, _mpo_mean_loss(stats, trainer.loss_config, None, accumulation))
    # The BCO terms themselves are compared: in the total, float32 rounding of the SFT term can swallow them.
    own, running = (
        _bco_terms(stats, trainer.loss_config, delta) for delta in (None, sum(means) / len(means))
    )
    assert (own - running).abs().max().item() > 1e-7, "the two options must differ by the third batch"


def _bco_terms(stats, cfg, bco_delta: float | None) -> torch.Tensor:
    stats.bco_delta = bco_delta
    return mpo_loss(stats, cfg)[1]["bco_pair"]


@pytest.mark.slow
def test_mpo_resume_equals_uninterrupted_run(train_data, tmp_path):
    flags = {**RESUME_FLAGS, "learning_rate": 1e-2}
    full = run_main(train_argv(train_data, tmp_path / "full", "mpo", max_steps=4, **flags))
    out = tmp_path / "resumed"
    first = run_main(train_argv(train_data, out, "mpo", max_steps=2, **flags))
    saved = json.loads((out / "checkpoint-2" / FILENAME).read_text())
    assert saved["count"] == pytest.approx(first.bco_running_mean.count) and saved["count"] == pytest.approx(
        4
    )
    resumed = run_main(train_argv(train_data, out, "mpo", max_steps=4, **flags))
    assert resumed.bco_running_mean.count == pytest.approx(full.bco_running_mean.count)
    assert resumed.bco_running_mean.mean == pytest.approx(full.bco_running_mean.mean, abs=1e-9)
    assert max_abs_diff(weights(resumed.model), weights(first.model)) > 1e-5
    torch.testing.assert_close(weights(resumed.model), weights(full.model), rtol=1e-5, atol=1e-6)
