"""The output directory of one training run: its lock and its identity (issue 15).

Lock (`run.lock`): created with O_EXCL by the run's main process before anything else is written, holding
host, pid and start time, and removed when the run ends (also on an error). A second run into the same
directory finds it and refuses at once. A lock left by a killed run is stale when it names this host and a
pid that is no longer alive: it is taken over with a warning. A lock from another host cannot be checked
from here, so it is refused with the way out (delete it if that run is gone).

Identity (`run_identity.json`): the settings that define what the directory's weights are trained with
(data fingerprint, loss and its options, model sources, learning rates, batch, seed, template, ...),
written when the run starts. A rerun into a directory that holds trained state (a checkpoint-N or a final
model) resumes only when its identity is the same; else it refuses naming each differing setting, unless
`--overwrite_output_dir`, which removes the previous run's checkpoints, final model files, reference cache
and sample order first. The run's length (`max_steps`, `num_train_epochs`) is not part of the identity, so a
finished run can be extended; its cosine schedule then follows the new length.
"""

from __future__ import annotations

import datetime
import errno
import json
import logging
import os
import re
import shutil
import socket
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)

CHECKPOINT_NAME = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-\d+$")
LOCK_FILE = "run.lock"
IDENTITY_FILE = "run_identity.json"
# What a run leaves in OUTPUT_DIR: removed by --overwrite_output_dir before the new run starts.
RUN_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "trainer_state.json",
    "training_args.json",
    "all_results.json",
    "train_results.json",
    "ref_logps.json",
    "sample_order.jsonl",
    "skipped_records.jsonl",
    "export.json",
    "adapter_config.json",
    "completions.jsonl",
    IDENTITY_FILE,
)
RUN_DIRS = ("vision_encoder", "projector", "lora_base")
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


class RunLock:
    """`OUTPUT_DIR/run.lock` for the duration of a run (module docstring)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / LOCK_FILE
        self.held = False

    def _create(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        owner = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(owner) + "\n")
        self.held = True
        return True

    def owner(self) -> dict:
        try:
            return json.loads(self.path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def acquire(self) -> None:
        if self._create():
            return
        owner = self.owner()
        host, pid = owner.get("host"), owner.get("pid")
        if host == socket.gethostname() and isinstance(pid, int) and not _pid_alive(pid):
            logger.warning(
                "%s: stale lock of pid %d (started %s) on this host, which is no longer running; taking it over.",
                self.path,
                pid,
                owner.get("started"),
            )
            self.path.unlink(missing_ok=True)
            if self._create():
                return
            owner = self.owner()
        where = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        hint = (
            "Wait for it, or use another --output_dir."
            if owner.get("host") == socket.gethostname()
            else "If that run is gone, delete the lock file."
        )
        raise RuntimeError(f"{self.path.parent} is in use by another run ({where}; {self.path}). {hint}")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def check_writable(output_dir: str | Path) -> None:
    """The output directory, or the nearest existing folder above it, accepts new files."""
    path = Path(output_dir).absolute()
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"--output_dir {output_dir}: {existing} is a file, not a directory.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(
            errno.EACCES, f"--output_dir {output_dir}: {existing} is not writable", str(existing)
        )


def checkpoint_dirs(output_dir: Path) -> list[Path]:
    """Every entry of `output_dir` named checkpoint-N (directories, and files that would block a save)."""
    return [p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if CHECKPOINT_NAME.match(p.name)]


def trained_state(output_dir: Path) -> list[str]:
    """Names of what in `output_dir` holds trained weights (checkpoints, a final model)."""
    found = sorted(p.name for p in checkpoint_dirs(output_dir))
    return found + [name for name in MODEL_FILES if (output_dir / name).is_file()]


def read_identity(output_dir: Path) -> dict | None:
    file = output_dir / IDENTITY_FILE
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())["settings"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{file}: unreadable run identity ({error!r}); use --overwrite_output_dir."
        ) from error


def identity_differences(saved: dict, current: dict) -> list[str]:
    return [
        f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]


def check_identity(output_dir: Path, identity: dict, overwrite: bool, resume: str | None = None) -> None:
    """Refuse to resume a directory whose trained state was made with other settings (module docstring).

    A trained directory without an identity (made before identities were recorded) is resumed only when
    the checkpoint is named (`resume`, --resume_from_checkpoint): the user vouches for it."""
    if overwrite or not output_dir.is_dir():
        return
    trained = trained_state(output_dir)
    if not trained:
        return
    saved = read_identity(output_dir)
    if saved is None and resume:
        logger.warning(
            "%s has no %s: resuming %s as asked, recording this run's settings",
            output_dir,
            IDENTITY_FILE,
            resume,
        )
        return
    if saved is None:
        raise ValueError(
            f"--output_dir {output_dir} holds a trained run ({', '.join(trained[:4])}) without {IDENTITY_FILE}, "
            "so it cannot be checked to be this run. Resume it by naming the checkpoint "
            "(--resume_from_checkpoint), use another --output_dir, or --overwrite_output_dir to start afresh there."
        )
    differences = identity_differences(saved, identity)
    if differences:
        raise ValueError(
            f"--output_dir {output_dir} holds a run ({', '.join(trained[:4])}) started with other settings; "
            "resuming it would mix two runs:\n  "
            + "\n  ".join(differences)
            + "\nUse another --output_dir, or --overwrite_output_dir to start afresh there."
        )


def clear_previous_run(output_dir: Path) -> None:
    """--overwrite_output_dir: remove what a previous run left (checkpoints, model, caches, logs)."""
    removed = [p for p in checkpoint_dirs(output_dir) if p.is_dir()]
    removed += [output_dir / d for d in RUN_DIRS if (output_dir / d).is_dir()]
    for path in removed:
        shutil.rmtree(path)
    files = [output_dir / f for f in RUN_FILES if (output_dir / f).is_file()]
    files += [p for p in output_dir.glob("*.safetensors") if p.is_file()]
    for file in files:
        file.unlink(missing_ok=True)
    if removed or files:
        logger.warning(
            "--overwrite_output_dir: removed the previous run's %s from %s",
            ", ".join(sorted({p.name for p in removed + files})),
            output_dir,
        )


def write_identity(output_dir: Path, identity: dict) -> None:
    payload = {
        "settings": identity,
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (output_dir / IDENTITY_FILE).write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
