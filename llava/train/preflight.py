"""Preflight of a training run: every check that needs no model, before a model is built or a file is
written (issue 15, "refuse, don't guess").

In order, each refusing with one line that names the flag, the path and what is wrong:
1. names: `--llm` and each `--vision_tower` part is a preset of llava.model.presets, an `org/name` hub id or
   an existing path; an unknown preset-like name (`siglip2-so61`) lists the closest presets (difflib)
   instead of reaching the hub and coming back as its generic offline error;
2. checkpoints: `--model_name_or_path` is a LLaVA checkpoint with weights (llava.model.model_dirs; an
   LLM-only folder or an exported vision_encoder/ would otherwise be wrapped into a default-size random
   LLaVA), `--stage3_source` a checkpoint or an export, `--pretrain_mm_mlp_adapter` and an explicit
   `--resume_from_checkpoint` exist;
3. data: `--data_path` (and `--image_folder`) exist: a .json/.jsonl file, a data table (saved dataset
   directory, parquet files or glob, hub id `org/name:CONFIG[:SPLIT]`) or a YAML mixture of them; the local
   files are fingerprinted (sha256 of their bytes), hub ids by name, config and split;
4. output: no FILE named checkpoint-N in OUTPUT_DIR (it would fail the save of step N, after training up
   to it), OUTPUT_DIR or the folder it will be made in is writable, and a finished or partly trained
   OUTPUT_DIR was started with this run's settings (llava.train.run_dir, run identity).
Only then the main process creates OUTPUT_DIR, takes its lock (llava.train.run_dir `RunLock`) and records
the run identity. A failed preflight leaves nothing behind; a run that fails before it saved anything
removes its identity, its lock and the OUTPUT_DIR it created if that is left empty.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from llava.data.errors import DataFileError
from llava.data.mixture import MIXTURE_FILE_SUFFIXES, data_inputs
from llava.model.model_dirs import is_hub_id, model_dir_kind, require_llava_checkpoint
from llava.model.presets import ENSEMBLE_SEPARATOR, LLM_PRESETS, LOCAL_VISION_PRESETS, VISION_PRESETS
from llava.train import run_dir

logger = logging.getLogger(__name__)

# The training settings that define a run (run identity); its length (max_steps, epochs) is left out.
IDENTITY_TRAINING_ARGS = (
    "loss_type",
    "beta",
    "dpo_alpha",
    "gamma",
    "mpo_weights",
    "bco_delta",
    "reference",
    "learning_rate",
    "mm_vision_tower_lr",
    "mm_projector_lr",
    "mm_tunable_parts",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "seed",
    "data_seed",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "optim",
    "adam_beta1",
    "adam_beta2",
    "adam_epsilon",
    "max_grad_norm",
    "bf16",
    "fp16",
    "num_generations",  # GRPO (llava.train.grpo_step)
    "max_completion_length",
    "temperature",
    "top_p",
    "epsilon",
    "epsilon_high",
    "num_iterations",
    "loss_normalization",
    "scale_rewards",
    "reward_funcs",
    "reward_weights",
)


def closest_presets(name: str, presets: list[str]) -> str:
    close = difflib.get_close_matches(name.lower(), presets, n=3, cutoff=0.5)
    return f"closest presets: {', '.join(close)}" if close else f"presets: {', '.join(sorted(presets))}"


def check_model_name(flag: str, name: str, presets: list[str]) -> None:
    """A preset, an `org/name` hub id or an existing path; anything else is refused with the closest presets."""
    if name.lower() in presets or os.path.exists(name) or is_hub_id(name):
        return
    looks_like_path = os.sep in name or name.startswith((".", "~"))
    what = "no such file or directory" if looks_like_path else "not a preset, an org/name hub id or a path"
    raise ValueError(f"{flag} {name!r}: {what} ({closest_presets(name, presets)}).")


def check_model_args(model_args) -> None:
    if model_args.llm:
        check_model_name("--llm", model_args.llm, list(LLM_PRESETS))
    if model_args.vision_tower:
        towers = list(VISION_PRESETS) + list(LOCAL_VISION_PRESETS)
        for part in model_args.vision_tower.split(ENSEMBLE_SEPARATOR):
            check_model_name("--vision_tower", part.strip(), towers)
    if model_args.model_name_or_path:
        require_llava_checkpoint(model_args.model_name_or_path, "--model_name_or_path")
    if model_args.stage3_source:
        source = model_args.stage3_source
        if not os.path.isdir(source) or model_dir_kind(source) not in ("export", "llava"):
            raise ValueError(
                f"--stage3_source {source}: neither a LLaVA checkpoint nor an exported encoder (export.json)."
            )
        if model_dir_kind(source) == "llava":
            require_llava_checkpoint(source, "--stage3_source")
    if model_args.pretrain_mm_mlp_adapter and not os.path.exists(model_args.pretrain_mm_mlp_adapter):
        raise FileNotFoundError(f"--pretrain_mm_mlp_adapter {model_args.pretrain_mm_mlp_adapter}: not found.")


def data_files(data_path: str) -> tuple[list[str], list[str]]:
    """(local files, hub ids) a run reads its records from: a .json/.jsonl file, a data table's files (saved
    dataset directory, parquet files or glob), or a YAML mixture and every file of its entries; the same
    enumeration the record store is keyed by (llava.data.mixture `data_inputs`). A missing source is refused,
    naming it."""
    mixture = os.path.splitext(data_path)[1].lower() in MIXTURE_FILE_SUFFIXES
    if mixture and not os.path.isfile(data_path):
        raise DataFileError(data_path, "--data_path: no such file")
    files = [data_path] if mixture else []
    try:
        inputs = data_inputs(data_path)
    except DataFileError as error:  # the flag named, as every preflight refusal does
        raise DataFileError(error.path, f"--data_path: {error.reason}") from error
    hub_ids = []
    for entry, found in inputs:
        files += found
        if not found:
            hub_ids.append(entry.json_path)
    return files, hub_ids


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _source(value: str | None) -> str | None:
    """A local path made absolute (the same run named from another directory), else the name as given."""
    return os.path.abspath(value) if value and os.path.exists(value) else value


def run_identity(model_args, data_args, train_args, lora_args=None) -> dict:
    """The settings that define a run (llava.train.run_dir), JSON-normalised for comparison."""
    model = asdict(model_args)
    del model[
        "attn_implementation"
    ]  # a kernel choice (flash-attn installed or not), not a setting of the run
    for key in ("model_name_or_path", "llm", "stage3_source", "pretrain_mm_mlp_adapter"):
        model[key] = _source(model[key])
    if model_args.vision_tower:
        model["vision_tower"] = ENSEMBLE_SEPARATOR.join(
            _source(part.strip()) for part in model_args.vision_tower.split(ENSEMBLE_SEPARATOR)
        )
    identity = {f"model.{key}": value for key, value in model.items()}
    files, hub_ids = data_files(data_args.data_path)
    identity["data.files"] = {os.path.abspath(f): file_sha256(f) for f in files}
    if hub_ids:  # by name, config and split, as the record store keys them
        identity["data.hub"] = hub_ids
    identity["data.image_folder"] = _source(data_args.image_folder)
    for key in ("conv_template", "model_max_length", "skip_invalid"):
        identity[f"data.{key}"] = getattr(data_args, key)
    for key in IDENTITY_TRAINING_ARGS:
        identity[key] = getattr(train_args, key)
    if lora_args is not None and lora_args.lora_enable:  # adapters or full weights: another run
        identity.update({f"lora.{key}": value for key, value in asdict(lora_args).items()})
        identity["lora.merge_lora_into"] = None  # where a merged copy goes does not change the run
    return json.loads(json.dumps(identity, default=str))


def check_output_dir(train_args) -> None:
    output_dir = Path(train_args.output_dir)
    if output_dir.is_dir():
        files = [p.name for p in run_dir.checkpoint_dirs(output_dir) if not p.is_dir()]
        if files:
            raise FileExistsError(
                f"--output_dir {output_dir}: {', '.join(sorted(files))} is a file, where the trainer saves its "
                f"{PREFIX_CHECKPOINT_DIR}-N directories. Move it away."
            )
    run_dir.check_writable(output_dir)
    resume = train_args.resume_from_checkpoint
    if resume and not os.path.isdir(resume):
        raise FileNotFoundError(f"--resume_from_checkpoint {resume}: no such checkpoint directory.")


def check(model_args, data_args, train_args, lora_args=None) -> dict:
    """Every check of the module docstring that writes nothing; returns the run identity."""
    check_model_args(model_args)
    if data_args.image_folder and not os.path.isdir(data_args.image_folder):
        raise FileNotFoundError(f"--image_folder {data_args.image_folder}: no such directory.")
    identity = run_identity(model_args, data_args, train_args, lora_args)
    check_output_dir(train_args)
    run_dir.check_identity(
        Path(train_args.output_dir),
        identity,
        train_args.overwrite_output_dir,
        train_args.resume_from_checkpoint,
    )
    return identity


@contextmanager
def preflight(model_args, data_args, train_args, lora_args=None) -> Iterator[None]:
    """Check (`check`), then hold OUTPUT_DIR for the run: lock, identity, cleanup on failure (docstring)."""
    identity = check(model_args, data_args, train_args, lora_args)
    if train_args.process_index != 0:
        yield
        return
    output_dir = Path(train_args.output_dir).absolute()
    created = [p for p in (output_dir, *output_dir.parents) if not p.exists()]  # innermost first
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir.RunLock(output_dir)
    try:
        lock.acquire()
    except BaseException:
        remove_empty(created)
        raise
    try:
        if train_args.overwrite_output_dir:
            run_dir.clear_previous_run(output_dir)
        saved = run_dir.read_identity(output_dir)
        if saved != identity:
            run_dir.write_identity(output_dir, identity)
        try:
            yield
        except BaseException:
            if saved is None and not run_dir.trained_state(output_dir):
                (output_dir / run_dir.IDENTITY_FILE).unlink(missing_ok=True)
            raise
    finally:
        lock.release()
        remove_empty(created)


def remove_empty(created: list[Path]) -> None:
    """Remove the directories this run created (innermost first) while they are empty."""
    for directory in created:
        if any(directory.iterdir()):
            return
        directory.rmdir()
