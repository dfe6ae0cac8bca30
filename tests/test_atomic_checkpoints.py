"""Checkpoints are staged and renamed into place; auto-resume skips an incomplete one (llava.train.checkpoints).

A run killed in the middle of saving checkpoint-4 must resume from checkpoint-2 and end equal to a run that
was never interrupted (the resume-equality pattern of tests/test_trainer_io.py).
"""

from __future__ import annotations

import pytest
import torch
import train_fixtures
from train_fixtures import run_main, train_argv, weights

from llava.train.checkpoints import STAGING_DIR, last_complete_checkpoint
from llava.train.trainer import PivotTrainer

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache

FLAGS = {
    "max_steps": 4,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "save_strategy": "steps",
    "save_steps": 2,
    "lr_scheduler_type": "constant",
}


class Killed(Exception):
    """Stands for the process dying while it writes a checkpoint."""


@pytest.mark.slow
def test_a_run_killed_mid_save_resumes_from_the_previous_checkpoint_and_ends_equal(
    train_data, tmp_path, monkeypatch, caplog
):
    full = run_main(train_argv(train_data, tmp_path / "full", "dpo", **FLAGS))

    out = tmp_path / "killed"
    save_rng_state = PivotTrainer._save_rng_state

    def dies_at_step_4(self, output_dir):
        if self.state.global_step == 4:
            raise Killed(output_dir)
        save_rng_state(self, output_dir)

    with monkeypatch.context() as patch:
        patch.setattr(PivotTrainer, "_save_rng_state", dies_at_step_4)
        with pytest.raises(Killed):
            run_main(train_argv(train_data, out, "dpo", **FLAGS))
    assert (out / "checkpoint-2" / "export.json").is_file(), "the export is saved inside the checkpoint"
    assert not (out / "checkpoint-4").exists(), "a partial save is never in place"
    assert (out / STAGING_DIR / "checkpoint-4" / "model.safetensors").is_file()
    # What a save interrupted by an older version left: checkpoint-4 with only config.json.
    (out / "checkpoint-4").mkdir()
    (out / "checkpoint-4" / "config.json").write_text((out / "checkpoint-2" / "config.json").read_text())

    loaded: list[str] = []
    load_from_checkpoint = PivotTrainer._load_from_checkpoint

    def records_the_resume(self, checkpoint, model=None):
        loaded.append(checkpoint)
        load_from_checkpoint(self, checkpoint, model)

    monkeypatch.setattr(PivotTrainer, "_load_from_checkpoint", records_the_resume)
    resumed = run_main(train_argv(train_data, out, "dpo", **FLAGS))
    assert "checkpoint-4 is incomplete" in caplog.text
    assert loaded == [str(out / "checkpoint-2")] and resumed.state.global_step == 4
    torch.testing.assert_close(weights(resumed.model), weights(full.model), rtol=1e-5, atol=1e-6)
    assert last_complete_checkpoint(out) == str(out / "checkpoint-4")
    assert (out / "checkpoint-4" / "export.json").is_file() and not (out / STAGING_DIR).exists()


def test_save_total_limit_rotates_in_the_output_dir(train_data, tmp_path):
    out = tmp_path / "out"
    run_main(train_argv(train_data, out, "sft", **{**FLAGS, "save_steps": 1, "save_total_limit": 2}))
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-4"]
    assert not (out / STAGING_DIR).exists()
