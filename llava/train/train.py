"""Entry point: `python -m llava.train.train [ModelArguments] [DataArguments] [PivotTrainingArguments]`.

One command for every stage (flags in llava.train.args). Order of work:
1. the preflight (llava.train.preflight: names, checkpoints, data sources, OUTPUT_DIR writable, locked and
   holding no other run);
2. the data, answered before any weights are read (`data_view`: the tokenizer, image processor and config of
   the model to train, read from a checkpoint's files or built from configs on the meta device): every record
   loaded into the record store, its kind checked against --loss_type, every record validated (an invalid one
   stops the run with file, id and reason unless --skip_invalid; fewer valid records than one optimizer step
   stop it either way), duplicate ids refused. OUTPUT_DIR holds only the preflight's lock and run identity
   until this passed, and a failure removes them (the store and its validation live in --data_cache_dir);
3. build or load the model, set the trainable parts (LoRA adapters), precompute reference log-probs if the
   loss needs them, then train with `PivotTrainer`, resuming automatically from the newest complete
   checkpoint in OUTPUT_DIR. The final model (plain HF checkpoint + tokenizer + image processor) goes to
   OUTPUT_DIR.
Stage 3 from a checkpoint source (not an export) reads its image-token rule from an export of that source's
encoder, staged in a hidden folder of OUTPUT_DIR and moved to OUTPUT_DIR/stage3_source_export only once the data
passed (llava.train.source_export): the one case where weights are read before the data is answered (give an
export as --stage3_source to avoid it); a refused run leaves no file.

The model is loaded in `train_args.weights_dtype` (fp32 unless --bf16 under DeepSpeed; llava.train.args).
Reference log-probs are scored once, by global rank 0 only (all nodes wait; OUTPUT_DIR is on a shared
filesystem, as checkpoints already assume), under the autocast training uses, and cached with a
fingerprint of everything they depend on (`reference_fingerprint`).

Stage 3 (llava.model.stage3): `--stage3_source` + `--llm` builds the new MLLM on the frozen encoder;
a Stage-3 checkpoint given to `--model_name_or_path` is reloaded with its projector, and its encoder
and reused projector layers are frozen whatever `--mm_tunable_parts` says. With `--export_encoder`
(default) the encoder-export hook (llava.train.callbacks) writes vision_encoder/, projector/ and
export.json into every checkpoint and OUTPUT_DIR; projector-only runs write OUTPUT_DIR/projector/ in
any case, which `--pretrain_mm_mlp_adapter` reloads. `--lora_enable` (llava.train.lora, flags in
`LoraArguments`) trains adapters on the parts' own rules; `--merge_lora_into` writes a merged checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
from contextlib import ExitStack
from dataclasses import asdict
from pathlib import Path

import transformers
from safetensors.torch import load_file
from transformers import HfArgumentParser

from llava.data.collator import DataCollator, PromptCollator
from llava.data.dataset import MultimodalDataset
from llava.data.errors import RecordError
from llava.data.mixture import refuse_duplicate_ids
from llava.data.prepared import DataSettings, default_cache_dir, prepare_dataset
from llava.export import cpu_state_dict, resolve_source, write_projector
from llava.file_checks import check_safetensors, read_json
from llava.model.builder import ModelConfig, build_model, build_model_view, load_model, load_model_view
from llava.model.image_tokens import image_token_counter
from llava.model.stage3 import Stage3Config, build_stage3_model, freeze_stage3, is_stage3, stage3_model_config
from llava.train.args import DataArguments, ModelArguments, PivotTrainingArguments
from llava.train.callbacks import EncoderExportCallback
from llava.train.checkpoints import last_complete_checkpoint
from llava.train.lora import LoraArguments, merge_lora_into, prepare_lora
from llava.train.losses import PREFERENCE_LOSSES
from llava.train.param_groups import parse_tunable_parts, set_trainable_parts
from llava.train.preflight import preflight
from llava.train.reference import compute_reference_logps, load_reference_logps, save_reference_logps
from llava.train.sampling import SAMPLE_ORDER_FILE
from llava.train.source_export import commit_source_export, staged_source_export
from llava.train.trainer import PivotTrainer
from patches.zero3_init import zero3_init_disabled

logger = logging.getLogger(__name__)

SKIPPED_FILE = "skipped_records.jsonl"


def stage3_config(model_args: ModelArguments, dtype: str) -> Stage3Config:
    return Stage3Config(
        source=model_args.stage3_source,
        llm=model_args.llm,
        projector_reuse_layers=model_args.projector_reuse_layers,
        image_aspect_ratio=model_args.image_aspect_ratio,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )


def model_config(model_args: ModelArguments, dtype: str) -> ModelConfig:
    """The builder's config of a model built from --llm and --vision_tower."""
    if not (model_args.llm and model_args.vision_tower):
        raise ValueError("Give --model_name_or_path (a checkpoint) or both --llm and --vision_tower.")
    return ModelConfig(
        llm=model_args.llm,
        vision_tower=model_args.vision_tower,
        mm_vision_select_layer=model_args.mm_vision_select_layer,
        mm_vision_select_feature=model_args.mm_vision_select_feature,
        mm_projector_type=model_args.mm_projector_type,
        image_aspect_ratio=model_args.image_aspect_ratio,
        dtype=dtype,
        attn_implementation=model_args.attn_implementation,
    )


def data_view(model_args: ModelArguments, dtype: str, source_export: Path | None = None):
    """(config, tokenizer, image_processor) of the model `load_or_build_model` gives, without its weights:
    all the data checks need (the tokenizer, the image processor, the image-token rule of the config). A
    checkpoint's are read from its files; a model to build is built from configs on the meta device
    (llava.model.builder `build_model_view`), Stage 3's on `source_export`, its source's exported encoder
    (llava.export `resolve_source`)."""
    if model_args.stage3_source:
        return build_model_view(stage3_model_config(stage3_config(model_args, dtype), source_export))
    if model_args.model_name_or_path:
        return load_model_view(model_args.model_name_or_path)
    return build_model_view(model_config(model_args, dtype))


def load_or_build_model(
    model_args: ModelArguments, dtype: str, output_dir: str = ".", source_export: Path | None = None
):
    """(model, tokenizer, image_processor) of the run; Stage 3 on `source_export` when it was resolved."""
    if model_args.stage3_source:
        cfg = stage3_config(model_args, dtype)
        return build_stage3_model(cfg, source_export or resolve_source(cfg.source, output_dir))
    if model_args.model_name_or_path:
        return load_model(model_args.model_name_or_path, dtype, model_args.attn_implementation)  # Stage 3 too
    model, tokenizer, image_processor = build_model(model_config(model_args, dtype))
    if model_args.pretrain_mm_mlp_adapter:
        load_projector(model, model_args.pretrain_mm_mlp_adapter)
    return model, tokenizer, image_processor


def load_projector(model, path: str) -> None:
    """Load projector weights (`linear_1.*`, `linear_2.*`) from a projector/ dir or safetensors file."""
    file = Path(path) / "model.safetensors" if Path(path).is_dir() else Path(path)
    check_safetensors(file)
    state = load_file(str(file))
    model.model.multi_modal_projector.load_state_dict(state)
    logger.info("loaded projector weights from %s", file)


def build_dataset(data_args, train_args, tokenizer, image_processor, config) -> MultimodalDataset:
    settings = DataSettings(
        data_path=data_args.data_path,
        image_folder=data_args.image_folder,
        conv_template=data_args.conv_template,
        model_max_length=data_args.model_max_length,
        cache_dir=data_args.data_cache_dir or default_cache_dir(),
        seed=train_args.seed,
        num_proc=data_args.data_num_proc,
        skip_invalid=data_args.skip_invalid,
        skip_log=os.path.join(train_args.output_dir, SKIPPED_FILE),
        group_by_length=data_args.group_by_length,
        length_data_path=data_args.length_data_path,
    )
    # The main process of the main node builds the record store and its validation; the others wait, then read.
    with train_args.main_process_first(local=False, desc="record store and validation"):
        prepared = prepare_dataset(
            settings, tokenizer, image_processor, image_token_counter(config), train_args.process_index == 0
        )
    dataset, parse_errors, invalid = prepared.dataset, prepared.parse_errors, prepared.validation.invalid
    kind = dataset.records.kind
    if train_args.loss_type in PREFERENCE_LOSSES and kind != "preference":
        raise ValueError(
            f"--loss_type {train_args.loss_type} needs preference records; {data_args.data_path} has {kind}s."
        )
    if (train_args.loss_type == "grpo") != (kind == "prompt"):
        raise ValueError(
            f"--loss_type {train_args.loss_type} with {data_args.data_path}, which has {kind} records: GRPO reads "
            "prompt records with an 'answer' (e.g. the MMPR converter's mmpr_grpo.json), and only GRPO reads them."
        )
    step = (
        train_args.per_device_train_batch_size
        * train_args.gradient_accumulation_steps
        * train_args.world_size
    )
    if parse_errors or invalid:
        handle_invalid(dataset, parse_errors, invalid, data_args.skip_invalid, train_args.output_dir, step)
        warn_unmatched_skips(len(parse_errors) + len(invalid), train_args.loss_type)
    elif len(dataset) < step:
        raise ValueError(
            f"{data_args.data_path}: {len(dataset)} record(s), fewer than one optimizer step needs ({step} = "
            "per-device batch x gradient accumulation x processes); a run would train 0 steps."
        )
    refuse_duplicate_ids(dataset.records, data_args.data_path)
    return dataset


def handle_invalid(
    dataset: MultimodalDataset,
    parse_errors: list[RecordError],
    invalid: list[tuple[int, RecordError]],
    skip: bool,
    output_dir: str,
    min_records: int = 1,
) -> None:
    """Stop on invalid records, or with `skip` remove them and list them in OUTPUT_DIR/skipped_records.jsonl.

    `parse_errors` are records that never entered the dataset (they failed parsing); `invalid` holds
    (position in `dataset.records`, error) from `MultimodalDataset.invalid_records()`. Records are removed
    by position, so a valid record sharing its id with an invalid one (mixtures may repeat ids) is kept.
    Each skipped record is one line: its id, data file and reason, plus `position` (index in the loaded
    dataset, before removal) for records removed from the dataset.
    Fewer than `min_records` (one optimizer step) remaining stops the run with the same report, before
    anything is written: a run that would train 0 steps must not exit 0 with a complete-looking model.
    """
    errors = parse_errors + [error for _, error in invalid]
    lines = [f"  {e.path} [{e.record_id}]: {e.reason}" for e in errors[:20]]
    summary = (
        f"{len(errors)} invalid record(s):\n" + "\n".join(lines) + ("\n  ..." if len(errors) > 20 else "")
    )
    if not skip:
        raise RecordError(errors[0].path, errors[0].record_id, f"{summary}\nFix them or pass --skip_invalid.")
    removed = {position for position, _ in invalid}
    kept = [position for position in range(len(dataset)) if position not in removed]
    if len(kept) < min_records:
        raise RecordError(
            errors[0].path,
            errors[0].record_id,
            f"{summary}\n--skip_invalid leaves {len(kept)} valid record(s), fewer than one optimizer step "
            f"needs ({min_records}); nothing to train on (is --image_folder right?).",
        )
    dataset.keep(kept)
    rows = [{"id": e.record_id, "file": e.path, "reason": e.reason} for e in parse_errors]
    rows += [{"id": e.record_id, "file": e.path, "reason": e.reason, "position": p} for p, e in invalid]
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    with open(Path(output_dir) / SKIPPED_FILE, "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    logger.warning("skipping %s; %d records remain (listed in %s)", summary, len(dataset), SKIPPED_FILE)


def warn_unmatched_skips(num_skipped: int, loss_type: str) -> None:
    """--skip_invalid removed records: a matched SFT/DPO comparison needs the other run to skip them too."""
    logger.warning(
        "--skip_invalid dropped %d invalid record(s) (ids in %s) from this --loss_type %s run. For a matched "
        "comparison the other loss's run must skip the same ids (e.g. a pair whose rejected reply is too long "
        "is invalid only for preference losses): remove them from its data too, and compare the ids of both "
        "runs' %s.",
        num_skipped,
        SKIPPED_FILE,
        loss_type,
        SAMPLE_ORDER_FILE,
    )


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def weight_files_fingerprint(path: str | None) -> dict[str, list[int]] | None:
    """{file name: [size, mtime_ns]} of the weight files and config.json at a local path (a model dir or one
    file); None for a hub id or no path. Retraining into the same directory changes it."""
    if not path or not os.path.exists(path):
        return None
    if os.path.isfile(path):
        files = [Path(path)]
    else:
        files = sorted(
            f
            for f in Path(path).iterdir()
            if f.is_file()
            and (f.name.endswith(WEIGHT_SUFFIXES + (".index.json",)) or f.name == "config.json")
        )
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def reference_fingerprint(model_args: ModelArguments, data_args: DataArguments, train_args) -> dict:
    """What the precomputed reference log-probs depend on (checked when a cache is reused): every model
    argument, the weight files behind each local model path, the dtypes, and the data settings."""
    sources = {
        "model_name_or_path": model_args.model_name_or_path,
        "llm": model_args.llm,
        "stage3_source": model_args.stage3_source,
        "pretrain_mm_mlp_adapter": model_args.pretrain_mm_mlp_adapter,
        **{f"vision_tower[{i}]": t for i, t in enumerate((model_args.vision_tower or "").split("+")) if t},
    }
    return {
        "model": model_args.model_name_or_path or f"{model_args.llm} + {model_args.vision_tower}",
        "model_args": asdict(model_args),
        "weight_files": {name: weight_files_fingerprint(path) for name, path in sources.items() if path},
        "weights_dtype": train_args.weights_dtype,
        "autocast_dtype": str(train_args.autocast_dtype),
        "data_path": os.path.abspath(data_args.data_path),
        "image_folder": os.path.abspath(data_args.image_folder) if data_args.image_folder else None,
        "conv_template": data_args.conv_template,
        "model_max_length": data_args.model_max_length,
        "seed": train_args.seed,
    }


def reference_logps(model, dataset, collator, train_args, fingerprint: dict) -> dict | None:
    if train_args.loss_type not in PREFERENCE_LOSSES or train_args.reference != "precomputed":
        return None
    path = train_args.ref_logps_path or os.path.join(train_args.output_dir, "ref_logps.json")
    # Global rank 0 scores every pair and writes the cache; every other process, on every node, waits, then
    # reads it (local=True would make one process per node score and write the same file concurrently).
    with train_args.main_process_first(local=False, desc="reference log-probs"):
        if not os.path.exists(path):
            device = train_args.device
            model.to(device)
            logps = compute_reference_logps(
                model,
                dataset,
                collator,
                train_args.per_device_eval_batch_size,
                device,
                train_args.share_image_encoding,
                train_args.autocast_dtype,
            )
            save_reference_logps(path, logps, reference=fingerprint)
    skipped = dataset.skipped_ids()  # corrupt images replaced under --skip_invalid: never looked up
    return load_reference_logps(path, [i for i in dataset.ids if i not in skipped], reference=fingerprint)


def resume_checkpoint(train_args) -> str | None:
    """--resume_from_checkpoint, else the newest complete checkpoint in OUTPUT_DIR (incomplete ones skipped,
    llava.train.checkpoints); the preflight made sure OUTPUT_DIR holds a run of the same settings."""
    if train_args.resume_from_checkpoint is not None or not os.path.isdir(train_args.output_dir):
        return train_args.resume_from_checkpoint
    last = last_complete_checkpoint(train_args.output_dir)
    if last is not None:
        logger.info("auto-resuming from %s", last)
    return last


def zero_stage(deepspeed: str | dict | None) -> int:
    """ZeRO stage of a DeepSpeed config (file path or dict); 0 without DeepSpeed."""
    if not deepspeed:
        return 0
    config = deepspeed if isinstance(deepspeed, dict) else read_json(deepspeed, "DeepSpeed config")
    return int(config.get("zero_optimization", {}).get("stage", 0))


def check_reference_mode(train_args: PivotTrainingArguments) -> None:
    """Refuse a live reference under ZeRO-3: it would be a full, unpartitioned copy of the model on every
    GPU (only the policy goes through the DeepSpeed engine), defeating ZeRO-3's memory savings."""
    if train_args.loss_type == "grpo" and train_args.beta > 0 and zero_stage(train_args.deepspeed) == 3:
        raise ValueError(
            f"--loss_type grpo --beta {train_args.beta} keeps a full frozen copy of the model on every GPU for the "
            f"KL term, but the DeepSpeed config {train_args.deepspeed} is ZeRO-3, chosen to partition it. Use "
            "--beta 0 (no KL term, as DAPO and Dr. GRPO), or a ZeRO-2 config (--deepspeed scripts/zero2.json)."
        )
    live = train_args.loss_type in PREFERENCE_LOSSES and train_args.reference == "live"
    if live and zero_stage(train_args.deepspeed) == 3:
        raise ValueError(
            f"--reference live keeps a full copy of the model on every GPU, but the DeepSpeed config "
            f"{train_args.deepspeed} is ZeRO-3, chosen to partition it. Use --reference precomputed (reference "
            "log-probs scored once before training, the default), or a ZeRO-2 config (--deepspeed scripts/zero2.json)."
        )


def run(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: PivotTrainingArguments,
    lora_args: LoraArguments | None = None,
) -> PivotTrainer:
    check_reference_mode(train_args)
    # Names, checkpoints, data files and OUTPUT_DIR checked, then OUTPUT_DIR locked (llava.train.preflight).
    with preflight(model_args, data_args, train_args, lora_args):
        return train_model(model_args, data_args, train_args, lora_args)


def train_model(
    model_args: ModelArguments,
    data_args: DataArguments,
    train_args: PivotTrainingArguments,
    lora_args: LoraArguments | None = None,
) -> PivotTrainer:
    # The data is answered first (kind vs --loss_type, invalid records, too few for one step), from the model's
    # tokenizer, image processor and config alone: no weights are read before it passed.
    source_export = None
    with ExitStack() as stack:
        if model_args.stage3_source:  # a checkpoint source's export is staged until the data passed
            source_export = stack.enter_context(
                staged_source_export(
                    model_args.stage3_source, train_args.output_dir, train_args.process_index
                )
            )
        with zero3_init_disabled():  # the meta-device view is no model for ZeRO-3 to partition
            config, tokenizer, image_processor = data_view(
                model_args, train_args.weights_dtype, source_export
            )
        dataset = build_dataset(data_args, train_args, tokenizer, image_processor, config)
        if model_args.stage3_source:
            source_export = commit_source_export(
                model_args.stage3_source, source_export, train_args.output_dir, train_args
            )
    transformers.set_seed(train_args.seed)
    with zero3_init_disabled():  # DeepSpeed partitions the model when training starts (patches.zero3_init)
        model, tokenizer, image_processor = load_or_build_model(
            model_args, train_args.weights_dtype, train_args.output_dir, source_export
        )
    parts = parse_tunable_parts(train_args.mm_tunable_parts)
    counts = set_trainable_parts(model, parts)
    if is_stage3(model.config):
        counts = freeze_stage3(model, parts)
    if lora_args is None or not lora_args.lora_enable:  # LoRA runs log their real set (llava.train.lora)
        logger.info("trainable parameters per part: %s", counts)
    model.config.pivot_loss_type = train_args.loss_type
    collator = PromptCollator() if train_args.loss_type == "grpo" else DataCollator(tokenizer.pad_token_id)
    if lora_args is not None and lora_args.lora_enable:
        model = prepare_lora(
            model,
            tokenizer,
            image_processor,
            parts,
            lora_args,
            model_args.model_name_or_path,
            train_args.output_dir,
            train_args.should_save,
        )
    ref = reference_logps(
        model, dataset, collator, train_args, reference_fingerprint(model_args, data_args, train_args)
    )
    trainer = PivotTrainer(
        model=model,
        args=train_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        ref_logps=ref,
        conv_template=data_args.conv_template,
    )
    if train_args.export_encoder:
        trainer.add_callback(EncoderExportCallback(image_processor, train_args.loss_type))
    trainer.train(resume_from_checkpoint=resume_checkpoint(train_args))
    trainer.save_model(train_args.output_dir)
    trainer.save_state()
    if trainer.is_world_process_zero():
        image_processor.save_pretrained(train_args.output_dir)
        Path(train_args.output_dir, "training_args.json").write_text(train_args.to_json_string())
    if parts == ("mm_mlp_adapter",) and not train_args.export_encoder:
        state = cpu_state_dict(model.model.multi_modal_projector, train_args.should_save)
        if state is not None:
            projector_dir = os.path.join(train_args.output_dir, "projector")
            write_projector(state, projector_dir, model.config.projector_hidden_act)
    if lora_args is not None and lora_args.merge_lora_into and trainer.is_world_process_zero():
        merge_lora_into(train_args.output_dir, lora_args.merge_lora_into)
    return trainer


def main(argv: list[str] | None = None) -> PivotTrainer:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = HfArgumentParser((ModelArguments, DataArguments, PivotTrainingArguments, LoraArguments))
    model_args, data_args, train_args, lora_args = parser.parse_args_into_dataclasses(args=argv)
    return run(model_args, data_args, train_args, lora_args)


if __name__ == "__main__":
    main()
