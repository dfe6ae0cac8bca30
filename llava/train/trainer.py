"""The one trainer for Stage 1, Stage 2 (SFT, DPO, IPO, hinge, MPO, GRPO) and Stage 3 on `transformers.Trainer`.

Only the loss differs between an SFT and a DPO run: both read one dataset class through one
`MatchedSampler` (llava.train.sampling), with the same batch size and number of steps, and log the
sample ids of every optimizer step to `sample_order.jsonl`. The trainer keeps a handle to its
`MatchedSampler` and sets its epoch from the trainer state at every epoch begin: on a multi-process
resume accelerate wraps it as SkipBatchSampler → BatchSamplerShard → BatchSampler → MatchedSampler,
deeper than `DataLoaderShard.set_epoch` and Trainer's own `set_epoch` calls reach, so a run resumed
inside epoch ≥ 2 would otherwise replay epoch 1's order.

Precision: with `--bf16` and no DeepSpeed the weights stay fp32 (llava.train.args `weights_dtype`) and
the whole loss computation (vision tower and projector too, which `encode_images` calls outside the
model's autocast-wrapped `forward`, and the live reference) runs under the accelerator's autocast.

Normalisation across gradient accumulation and processes is done here (`loss_is_scaled_for_ga`):
- SFT: summed token NLL / number of supervised tokens in the whole optimizer step (HF's rule, so a
  batch of 8 equals 1×8 with accumulation even when responses differ in length);
- preference losses: mean over the micro-batch's pairs / accumulation steps (equal-size micro-batches
  give the exact mean over the step's pairs).

Logged every `logging_steps`: loss parts, rewards/{chosen,rejected,margins,accuracies},
logps/{chosen,rejected}, samples/s and tokens/s (non-padding tokens, both sides of a pair), and
padding_fraction (padded tokens / computed tokens, both sides of a pair; `--group_by_length` lowers it).

GRPO (`--loss_type grpo`): `get_batch_samples` hands each optimizer step's micro-batches of prompts to
llava.train.grpo_step, which samples, rewards and scores the completions before the step's forward and
backward passes; its sampling RNG is saved in every checkpoint and restored on resume.

Resume: `save_pretrained` writes Llava checkpoints with the original (pre-4.52) key names, which
`Trainer._load_from_checkpoint` loads with a raw non-strict `load_state_dict`, so no weight matched and
a resumed run silently went on from the initial weights (transformers#43701). Checkpoint keys are
renamed with the model's own loading conversions (patches.checkpoint_keys) and loaded strictly (only
tied weights may be absent); this also covers Stage-3 projectors of other shapes. LoRA runs
(llava.train.lora) save and resume their adapters and fully trained parts, and their live reference is
the base model with the adapters disabled instead of a copy.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections import defaultdict

import torch
from transformers import PreTrainedModel, Trainer, TrainerCallback

from llava.data.templates import get_template
from llava.file_checks import check_safetensors_in
from llava.train.callbacks import EncoderExportCallback
from llava.train.checkpoints import staged_checkpoint
from llava.train.grpo_step import GRPOStep
from llava.train.logps import chosen_logps, pair_logps
from llava.train.lora import adapters_disabled, load_adapter_checkpoint, peft_model_of, save_lora_extras
from llava.train.losses import LOSSES, PREFERENCE_LOSSES, LossConfig, PairStats, batch_reward_mean
from llava.train.param_groups import build_param_groups, check_deepspeed_config, describe_groups
from llava.train.reference import lookup
from llava.train.running_mean import RunningMean
from llava.train.sampling import MatchedSampler, SampleOrderLog
from patches.checkpoint_keys import checkpoint_state_for, safetensors_files

logger = logging.getLogger(__name__)


class PivotTrainer(Trainer):
    """`Trainer` whose only per-run difference is `args.loss_type` (see module docstring)."""

    def __init__(
        self,
        *args,
        ref_logps: dict[str, tuple[float, float]] | None = None,
        conv_template: str = "qwen_1_5",
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True
        # Set per optimizer step by Trainer's loop; this default serves compute_loss calls outside train().
        self.current_gradient_accumulation_steps = self.args.gradient_accumulation_steps
        self.loss_config = LossConfig(beta=self.args.beta, mpo_weights=self.args.mpo_weight_tuple)
        self.ref_logps = ref_logps
        running = self.args.loss_type == "mpo" and self.args.bco_delta == "running"
        self.bco_running_mean = RunningMean() if running else None
        self.ref_model = None
        live = self.args.loss_type in PREFERENCE_LOSSES and self.args.reference == "live"
        self.reference_is_base = live and peft_model_of(self.model) is not None  # LoRA: adapters off
        if live and not self.reference_is_base:
            # Trainer places the policy itself except under DeepSpeed; the reference always goes to the device.
            self.ref_model = copy.deepcopy(self.model).eval().requires_grad_(False).to(self.args.device)
        if (
            self.args.loss_type in PREFERENCE_LOSSES
            and self.args.reference == "precomputed"
            and ref_logps is None
        ):
            raise ValueError("reference='precomputed' needs ref_logps (see llava.train.reference).")
        check_deepspeed_config(
            self.args.deepspeed,
            self.args.mm_vision_tower_lr is not None or self.args.mm_projector_lr is not None,
        )
        self.sample_log = SampleOrderLog(self.args.output_dir)
        self.matched_sampler: MatchedSampler | None = None
        self._step_ids: list[str] = []
        self._metrics: dict[str, list[float]] = defaultdict(list)
        self._throughput = {"samples": 0, "tokens": 0, "computed": 0, "since": time.perf_counter()}
        self.param_group_specs = []
        self.add_callback(_StepEndCallback(self))
        self.grpo = (
            GRPOStep(self, get_template(conv_template).reply_suffix)
            if self.args.loss_type == "grpo"
            else None
        )

    # ---- data -------------------------------------------------------------------------------
    def _get_train_sampler(self, train_dataset=None) -> torch.utils.data.Sampler:
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        ids = getattr(dataset, "ids", None)
        if ids is None or len(ids) != len(dataset):
            raise TypeError(
                f"{type(dataset).__name__} has no `ids` list (one sample id per item): MatchedSampler orders "
                "samples by id (llava.train.sampling)."
            )
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        lengths = getattr(dataset, "group_lengths", None)  # --group_by_length (llava.data.prepared)
        step = self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps
        mega_batch = None if lengths is None else step * self.args.world_size
        self.matched_sampler = MatchedSampler(ids, seed, lengths, mega_batch)
        return self.grpo.wrap_sampler(self.matched_sampler) if self.grpo else self.matched_sampler

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items_in_batch = super().get_batch_samples(epoch_iterator, num_batches, device)
        if self.grpo is not None and batches:
            return self.grpo.prepare(batches, self.state.global_step)
        return batches, num_items_in_batch

    # ---- checkpoints ----------------------------------------------------------------------
    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        if self.bco_running_mean is not None:
            self.bco_running_mean = RunningMean.load(resume_from_checkpoint)
        if self.grpo is not None:
            self.grpo.load(resume_from_checkpoint)
        model = model if model is not None else self.model
        if peft_model_of(model) is not None:
            load_adapter_checkpoint(model, resume_from_checkpoint)
            return
        files = safetensors_files(resume_from_checkpoint)
        check_safetensors_in(resume_from_checkpoint)  # a truncated file names itself (llava.file_checks)
        if self.is_fsdp_enabled or not files or not isinstance(model, PreTrainedModel):
            super()._load_from_checkpoint(resume_from_checkpoint, model)
            return
        state = checkpoint_state_for(model, files)
        result = model.load_state_dict(state, strict=False)
        required = {}  # one name per tensor: a tied weight (lm_head = embed_tokens) is saved once
        for name, tensor in model.state_dict(keep_vars=True).items():
            required.setdefault(id(tensor), name)
        missing = sorted(set(result.missing_keys) & set(required.values()))
        if missing or result.unexpected_keys:
            raise ValueError(
                f"checkpoint {resume_from_checkpoint} does not match the model: missing {missing[:5]}, "
                f"unexpected {result.unexpected_keys[:5]}"
            )
        logger.info("loaded %d model tensors from %s", len(state), resume_from_checkpoint)

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict)
        if self.args.should_save:
            save_lora_extras(self.model, output_dir or self.args.output_dir)

    def _save_checkpoint(self, model, trial) -> None:
        with staged_checkpoint(self, trial) as (folder, final):  # renamed into place when complete
            super()._save_checkpoint(model, trial)
            if self.bco_running_mean is not None and self.args.should_save:
                self.bco_running_mean.save(folder)
            for callback in self.callback_handler.callbacks:
                if isinstance(callback, EncoderExportCallback):
                    callback.export(self.model, folder, self.args, self.state, source=final)
            if self.grpo is not None:  # every process saves its own sampling RNG
                self.grpo.save(folder)

    # ---- optimizer ------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        if self.optimizer is not None:
            return self.optimizer
        model = model if model is not None else self.model
        groups, self.param_group_specs = build_param_groups(
            model,
            self.args.learning_rate,
            self.args.weight_decay,
            self.args.mm_vision_tower_lr,
            self.args.mm_projector_lr,
        )
        optimizer_cls, optimizer_kwargs = Trainer.get_optimizer_cls_and_kwargs(self.args, model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(groups, lr=self.args.learning_rate, **optimizer_kwargs)
        logger.info(describe_groups(self.param_group_specs, model))
        return self.optimizer

    # ---- loss ------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop("sample_ids")
        if model.training:
            self._step_ids.extend(ids)
        if self.grpo is not None:
            loss = self.grpo.loss(model, inputs, num_items_in_batch)
            return (loss, {"loss": loss}) if return_outputs else loss
        loss_type = self.args.loss_type
        tokens = int(inputs["attention_mask"].sum())
        computed = inputs["attention_mask"].numel()  # with padding: --group_by_length lowers the difference
        with self.accelerator.autocast():  # a no-op unless --bf16/--fp16 without DeepSpeed
            if loss_type in PREFERENCE_LOSSES:
                tokens += int(inputs["rejected_attention_mask"].sum())
                computed += inputs["rejected_attention_mask"].numel()
                stats = self._pair_stats(model, inputs, ids)
            else:
                policy, counts = chosen_logps(model, inputs)
                stats = PairStats(policy, None, None, None, counts, None)
        if self.bco_running_mean is not None:
            stats.bco_delta = self._running_bco_delta(stats, model.training)
        per_sample, parts = LOSSES[loss_type](stats, self.loss_config)
        # The SFT loss, and the --gamma SFT term of a preference loss: token-weighted over the optimizer step.
        nll_sum, tokens_sum = -stats.policy_chosen.sum(), stats.chosen_tokens.sum()
        if loss_type == "sft":
            loss = self._token_normalised(nll_sum, tokens_sum, num_items_in_batch)
            parts = {"sft": nll_sum / tokens_sum.clamp(min=1)}  # log the token-weighted NLL optimised here
        else:
            loss = self.args.dpo_alpha * per_sample.mean()
            if model.training:
                loss = loss / self.current_gradient_accumulation_steps
            if self.args.gamma:
                loss = loss + self.args.gamma * self._token_normalised(
                    nll_sum, tokens_sum, num_items_in_batch
                )
        if model.training:
            self._record(stats, parts, len(ids), tokens, computed)
        return (loss, {"loss": loss}) if return_outputs else loss

    def _running_bco_delta(self, stats: PairStats, training: bool) -> float:
        """InternVL's MPO δ: the running mean of micro-batch mean rewards over steps and ranks, updated
        with this micro-batch (every rank's at once) before use; evaluation reads it without updating."""
        if training:
            batch_mean = batch_reward_mean(stats, self.loss_config).reshape(1).float()
            if self.args.world_size > 1:
                batch_mean = self.accelerator.gather(batch_mean)
            self.bco_running_mean.update(batch_mean)
        return self.bco_running_mean.mean

    def _token_normalised(self, nll_sum, local_tokens, num_items_in_batch) -> torch.Tensor:
        if not self.model.training:
            return nll_sum / local_tokens.clamp(min=1)
        if num_items_in_batch is None:  # Trainer counts tokens only for models that accept loss kwargs
            return nll_sum / local_tokens.clamp(min=1) / self.current_gradient_accumulation_steps
        loss = nll_sum / num_items_in_batch
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            loss = loss * self.accelerator.num_processes
        return loss

    def _pair_stats(self, model, inputs, ids) -> PairStats:
        share = self.args.share_image_encoding
        chosen, rejected, chosen_n, rejected_n = pair_logps(model, inputs, share)
        if self.ref_model is not None:
            with torch.no_grad():
                ref_chosen, ref_rejected, _, _ = pair_logps(self.ref_model, inputs, share)
        elif self.reference_is_base:
            with adapters_disabled(model) as base:
                ref_chosen, ref_rejected, _, _ = pair_logps(base, inputs, share)
        else:
            ref_chosen, ref_rejected = lookup(self.ref_logps, ids, chosen.device)
        return PairStats(chosen, rejected, ref_chosen, ref_rejected, chosen_n, rejected_n)

    # ---- logging ---------------------------------------------------------------------------
    def _record(
        self, stats: PairStats, parts: dict[str, torch.Tensor], samples: int, tokens: int, computed: int
    ) -> None:
        for name, value in parts.items():
            self._metrics[f"loss/{name}"].append(value.detach().mean().item())
        self._metrics["logps/chosen"].append(stats.policy_chosen.detach().mean().item())
        if stats.policy_rejected is not None:
            chosen, rejected = stats.rewards(self.loss_config.beta)
            self._metrics["logps/rejected"].append(stats.policy_rejected.detach().mean().item())
            self._metrics["rewards/chosen"].append(chosen.mean().item())
            self._metrics["rewards/rejected"].append(rejected.mean().item())
            self._metrics["rewards/margins"].append((chosen - rejected).mean().item())
            self._metrics["rewards/accuracies"].append((chosen > rejected).float().mean().item())
        self._throughput["samples"] += samples
        self._throughput["tokens"] += tokens
        self._throughput["computed"] += computed

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:
            keys = sorted(self._metrics)
            local = [sum(self._metrics[k]) / len(self._metrics[k]) for k in keys]
            local += [float(self._throughput[k]) for k in ("samples", "tokens", "computed")]
            totals = torch.tensor(local, device=self.args.device)
            if self.args.world_size > 1:  # every process calls log() at the same step
                totals = self.accelerator.reduce(totals, reduction="sum")
                totals[: len(keys)] /= self.args.world_size
            elapsed = max(time.perf_counter() - self._throughput["since"], 1e-9)
            logs.update({key: value for key, value in zip(keys, totals[: len(keys)].tolist())})
            logs["samples/s"] = totals[-3].item() / elapsed
            logs["tokens/s"] = totals[-2].item() / elapsed
            logs["padding_fraction"] = 1.0 - totals[-2].item() / max(totals[-1].item(), 1.0)
            self._metrics.clear()
            if self.grpo is not None:
                self.grpo.write_table(self.state.global_step)
            self._throughput = {"samples": 0, "tokens": 0, "computed": 0, "since": time.perf_counter()}
        super().log(logs, start_time)

    def flush_step_ids(self) -> list[str]:
        ids, self._step_ids = self._step_ids, []
        if self.args.world_size > 1:
            from accelerate.utils import gather_object

            ids = gather_object(ids)
        return ids


class _StepEndCallback(TrainerCallback):
    """Sets the sampler's epoch at every epoch begin; writes each optimizer step's sample ids to
    sample_order.jsonl (main process)."""

    def __init__(self, trainer: PivotTrainer) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            self.trainer.sample_log.truncate_after(state.global_step)
        self.trainer._step_ids = []
        self.trainer._throughput = {"samples": 0, "tokens": 0, "computed": 0, "since": time.perf_counter()}

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is e + (batches done)/(batches per epoch): its floor is the epoch being started, also
        # when a resumed run starts inside one (Trainer's `epochs_trained`); called before the loader is iterated.
        if self.trainer.matched_sampler is not None:
            self.trainer.matched_sampler.set_epoch(math.floor(state.epoch or 0.0))

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.grpo is not None:
            self.trainer.grpo.step_ended()
        ids = self.trainer.flush_step_ids()
        if state.is_world_process_zero:
            self.trainer.sample_log.append(state.global_step, round(state.epoch or 0.0, 6), ids)
