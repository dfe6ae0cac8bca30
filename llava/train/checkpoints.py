"""Checkpoints written atomically, and auto-resume from the newest complete one (issue 15).

`staged_checkpoint`: the trainer writes `checkpoint-N` into `OUTPUT_DIR/.checkpoint-staging/` (every file:
weights, optimizer, scheduler, RNG, trainer state, and what the trainer adds: the encoder export, MPO's running
mean), every process waits, then the main process renames it to `OUTPUT_DIR/checkpoint-N`. A run killed
mid-save leaves only the staging folder (cleared at the next save), never a partial `checkpoint-N`.

`last_complete_checkpoint`: the newest `checkpoint-N` that holds weights and `trainer_state.json`; newer
incomplete ones (a save killed by an older version, a partial copy) are skipped with a warning.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from llava.file_checks import FileFormatError, check_safetensors_in
from llava.model.model_dirs import has_weights
from llava.train.run_dir import checkpoint_dirs

logger = logging.getLogger(__name__)

STAGING_DIR = ".checkpoint-staging"
TRAINER_STATE = "trainer_state.json"


def is_complete(checkpoint: Path) -> bool:
    """trainer_state.json and weights present, every safetensors file whole (llava.file_checks)."""
    if not (checkpoint / TRAINER_STATE).is_file():
        return False
    if not (has_weights(checkpoint) or any(checkpoint.glob("global_step*"))):  # or DeepSpeed's own layout
        return False
    try:
        check_safetensors_in(checkpoint)
    except FileFormatError as error:
        logger.warning("%s", error)
        return False
    return True


def last_complete_checkpoint(output_dir: str | Path) -> str | None:
    """The newest complete `checkpoint-N` of `output_dir` (module docstring), or None."""
    found = [p for p in checkpoint_dirs(Path(output_dir)) if p.is_dir()]
    for checkpoint in sorted(found, key=lambda p: int(p.name.rsplit("-", 1)[1]), reverse=True):
        if is_complete(checkpoint):
            return str(checkpoint)
        logger.warning(
            "%s is incomplete (no %s, no weights or a truncated one: a save that was interrupted); skipping it.",
            checkpoint,
            TRAINER_STATE,
        )
    return None


def publish(staged: Path, final: Path) -> None:
    """Rename the staged checkpoint into place (replacing a checkpoint of the same step, e.g. after resume)."""
    old = staged.parent / f"{final.name}.old"
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(staged, final)
    shutil.rmtree(old, ignore_errors=True)


@contextmanager
def staged_checkpoint(trainer, trial) -> Iterator[tuple[Path, Path]]:
    """Make the trainer's `_save_checkpoint` write into the staging folder; publish it on exit.

    Yields (staged folder, final folder): extra files go to the first, paths recorded in them name the second. The trainer's own checkpoint rotation,
    which ran inside the staging folder, is redone in OUTPUT_DIR once the new checkpoint is in place.
    """
    run_dir = trainer._get_output_dir(trial)
    name = f"{PREFIX_CHECKPOINT_DIR}-{trainer.state.global_step}"
    staging = Path(run_dir) / STAGING_DIR
    staged, final = staging / name, Path(run_dir) / name
    if trainer.args.should_save:
        shutil.rmtree(staged, ignore_errors=True)  # left by a save that was killed
    trainer.accelerator.wait_for_everyone()
    original = trainer._get_output_dir
    trainer._get_output_dir = lambda trial=None: str(staging)
    try:
        yield staged, final
    finally:
        trainer._get_output_dir = original
    trainer.accelerator.wait_for_everyone()
    if trainer.args.should_save:
        publish(staged, final)
        if trainer.state.best_model_checkpoint == str(staged):
            trainer.state.best_model_checkpoint = str(final)
        rotate_checkpoints(run_dir, trainer.args.save_total_limit, trainer.state.best_model_checkpoint)
        if not any(staging.iterdir()):
            staging.rmdir()
    trainer.accelerator.wait_for_everyone()
