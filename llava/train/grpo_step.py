"""One GRPO optimizer step inside `PivotTrainer` (`--loss_type grpo`, issue 16).

GRPO (Shao et al. 2024, DeepSeekMath) as a fourth kind of Stage-2 run on the prompts the matched sampler
gives SFT and DPO (same ids, same order, logged to `sample_order.jsonl` by the trainer). Per optimizer
step (`prepare`, called from `PivotTrainer.get_batch_samples` once the step's micro-batches are
fetched), for every micro-batch:

1. each prompt's images are encoded once (vision tower + projector, no gradient) and G =
   `--num_generations` completions are sampled from the current policy with those features
   (llava.train.generation, `--temperature`, `--top_p`, `--max_completion_length`);
2. the completions are decoded and rewarded (`--reward_funcs`, `--reward_weights`, llava.train.rewards);
   advantages are group-normalised (llava.train.grpo.group_advantages; groups never span processes);
3. with `--num_iterations` μ > 1 the old policy's per-token log-probs are scored once (no gradient);
   with `--beta` > 0 the frozen reference's are too (its own tower, also once per prompt).

`loss` then scores the B·G completions with gradient, the image features of each prompt computed once
and repeated for its G rows (their gradients add up in the one encoding; `share_image_encoding False`
encodes every row's image itself, the per-completion path the shared one must equal), and applies the
clipped surrogate (llava.train.grpo.grpo_loss; `--loss_normalization` grpo | dapo | dr_grpo). When the
tower and projector are frozen the generation's features are reused for scoring too. Log-probs are those
of the sampling distribution: logits divided by `--temperature`, as TRL does.

Normalisation over accumulation and processes: `dapo` divides by the completion tokens of the whole
optimizer step, all processes (gathered in `prepare`; TRL's `num_items_in_batch / num_processes`);
`grpo` and `dr_grpo` are per micro-batch means divided by the accumulation steps.

μ > 1: the sampler yields each optimizer step's block of prompts μ times in a row (`StepRepeatSampler`),
so one generation batch serves μ consecutive optimizer steps (TRL's `num_iterations`), and
`sample_order.jsonl` lists its ids once per step.

Logged every `--logging_steps`: reward mean/std per function and in total, the fraction of groups
with zero reward variance, completion length (mean, min, max, clipped = no stop token), clip ratio,
KL, seconds per step spent sampling (image encoding + `generate`), generating in all (sampling, rewards,
old and reference log-probs) and training (the rest of the step); a table of the step's first group of completions with
their rewards is appended to `OUTPUT_DIR/completions.jsonl` (and logged to wandb when reported to).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Sampler

from llava.train.generation import BACKENDS, Completions, GenerationRNG, SamplingConfig, stop_token_ids
from llava.train.grpo import GRPOConfig, group_advantages, grpo_loss
from llava.train.logps import IGNORE_INDEX, embed_with_images, encode_images, unwrap
from llava.train.rewards import combined_rewards

logger = logging.getLogger(__name__)

COMPLETIONS_FILE = "completions.jsonl"


class StepRepeatSampler(Sampler[int]):
    """Yields each block of `block` indices of `sampler` `repeats` times in a row (GRPO's μ reuse)."""

    def __init__(self, sampler: Sampler[int], block: int, repeats: int) -> None:
        self.sampler, self.block, self.repeats = sampler, block, repeats

    def __len__(self) -> int:
        return len(self.sampler) * self.repeats

    def __iter__(self) -> Iterator[int]:
        order = list(self.sampler)
        for start in range(0, len(order), self.block):
            for _ in range(self.repeats):
                yield from order[start : start + self.block]


@dataclass
class GRPOMicroBatch:
    """A micro-batch of B prompts with its B·G scored completions (tensors on the training device)."""

    sample_ids: list[str]
    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    image_counts: list[int]  # images per prompt
    image_tokens: list[int]  # visual tokens per prompt
    completions: Completions
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor
    features: torch.Tensor | None = None  # reusable features (frozen tower and projector)
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


def repeat_rows(features: torch.Tensor | None, tokens_per_prompt: Sequence[int], repeats: int):
    """Each prompt's slice of the concatenated features, `repeats` times in a row (rows of a group)."""
    if features is None:
        return None
    chunks = torch.split(features, list(tokens_per_prompt))
    return torch.cat([chunk for chunk in chunks for _ in range(repeats)])


def repeat_images(pixel_values, image_sizes, image_counts: Sequence[int], repeats: int):
    """Each prompt's images `repeats` times in a row: the per-completion (naive) encoding path."""
    if pixel_values is None:
        return None, None
    starts = [sum(image_counts[:i]) for i in range(len(image_counts))]
    index = [s + k for s, n in zip(starts, image_counts) for _ in range(repeats) for k in range(n)]
    index = torch.tensor(index, device=pixel_values.device)
    sizes = None if image_sizes is None else image_sizes[index]
    return pixel_values[index], sizes


def scoring_tensors(
    prompt_ids: Sequence[torch.Tensor], completions: Completions, repeats: int, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, labels) of prompt + completion per row, right-padded; only completion
    tokens are labelled."""
    rows = []
    for row, (ids, n) in enumerate(zip(completions.ids, completions.lengths.tolist())):
        prompt = prompt_ids[row // repeats].to(ids.device)
        rows.append((prompt, ids[:n]))
    length = max(len(p) + len(c) for p, c in rows)
    device = completions.ids.device
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long, device=device)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    attention_mask = torch.zeros_like(input_ids)
    for row, (prompt, completion) in enumerate(rows):
        end = len(prompt) + len(completion)
        input_ids[row, :end] = torch.cat([prompt, completion])
        labels[row, len(prompt) : end] = completion
        attention_mask[row, :end] = 1
    return input_ids, attention_mask, labels


def completion_logps(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    row_features: torch.Tensor | None,
    width: int,
    temperature: float,
) -> torch.Tensor:
    """Per-token log-probs of each row's labelled (completion) tokens, left-aligned: [rows, width].

    Logits are computed only at positions that predict a completion token (`logits_to_keep`).
    """
    embeds = embed_with_images(unwrap(model), input_ids, row_features)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    columns = valid.any(dim=0).nonzero()[:, 0]
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=columns).logits
    kept_valid = valid[:, columns]
    token_logps = torch.log_softmax(logits[kept_valid].float() / temperature, dim=-1)
    token_logps = token_logps.gather(-1, targets[:, columns][kept_valid].unsqueeze(-1)).squeeze(-1)
    rows = kept_valid.nonzero()[:, 0]
    position = (kept_valid.cumsum(dim=1) - 1)[kept_valid]
    out = torch.zeros(input_ids.shape[0], width, dtype=token_logps.dtype, device=token_logps.device)
    return out.index_put((rows, position), token_logps)


class GRPOStep:
    """Generation, rewards and loss of `--loss_type grpo` for one `PivotTrainer` (module docstring)."""

    def __init__(self, trainer, reply_suffix: str) -> None:
        args = trainer.args
        self.trainer = trainer
        self.sampling = SamplingConfig(
            args.num_generations, args.max_completion_length, args.temperature, args.top_p
        )
        scale = args.scale_rewards if args.scale_rewards is not None else args.loss_normalization != "dr_grpo"
        self.config = GRPOConfig(
            num_generations=args.num_generations,
            epsilon=args.epsilon,
            epsilon_high=args.epsilon_high,
            beta=args.beta,
            grpo_loss_type=args.loss_normalization,
            scale_rewards=scale,
            max_completion_length=args.max_completion_length,
        )
        tokenizer = trainer.processing_class
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_token_id
        self.backend = BACKENDS[args.generation_backend](self.pad_id, stop_token_ids(tokenizer, reply_suffix))
        self.rng = GenerationRNG(args.seed, args.process_index, args.device)
        self.reward_funcs = list(args.reward_funcs)
        self.reward_weights = list(args.reward_weights) if args.reward_weights else None
        combined_rewards(self.reward_funcs, self.reward_weights, [], [])  # unknown names fail here
        self.ref_model = None
        if self.config.beta:
            self.ref_model = copy.deepcopy(trainer.model).eval().requires_grad_(False).to(args.device)
        self.cache: tuple[list[list[str]], list[dict]] | None = None
        self.table: list[dict[str, Any]] = []
        self._generation_s = 0.0
        self._sampling_s = 0.0
        self._prepared_at: float | None = None

    # ---- sampler ---------------------------------------------------------------------------
    def wrap_sampler(self, sampler: Sampler[int]) -> Sampler[int]:
        args = self.trainer.args
        if args.num_iterations == 1:
            return sampler
        block = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        return StepRepeatSampler(sampler, block, args.num_iterations)

    # ---- encoding -------------------------------------------------------------------------
    def _frozen_encoder(self, model) -> bool:
        inner = unwrap(model).model
        parts = [inner.vision_tower, inner.multi_modal_projector]
        return not any(p.requires_grad for part in parts for p in part.parameters())

    def _row_features(self, model, mb: GRPOMicroBatch) -> torch.Tensor | None:
        """Image features of every completion row: encoded once per prompt (shared) or once per row."""
        G = self.config.num_generations
        if self.trainer.args.share_image_encoding:
            return repeat_rows(encode_images(model, mb.pixel_values, mb.image_sizes), mb.image_tokens, G)
        pixel_values, sizes = repeat_images(mb.pixel_values, mb.image_sizes, mb.image_counts, G)
        return encode_images(model, pixel_values, sizes)

    # ---- one optimizer step: generation, rewards, old and reference log-probs ------------------
    def prepare(self, batches: list[dict], global_step: int) -> tuple[list[dict], torch.Tensor]:
        """Attach `grpo` (a GRPOMicroBatch) to every micro-batch of the step; returns the batches and the
        step's completion-token count over every process (the `dapo` denominator)."""
        start = time.perf_counter()
        ids = [list(batch["sample_ids"]) for batch in batches]
        if global_step % self.trainer.args.num_iterations and self.cache is not None:
            cached_ids, prepared = self.cache
            if cached_ids != ids:
                raise RuntimeError(
                    f"GRPO reuse: step {global_step} got prompts {ids}, generated for {cached_ids}."
                )
            for batch, grpo in zip(batches, prepared):
                batch["grpo"] = grpo
        else:
            self.table = []
            self._sampling_s = 0.0
            for position, batch in enumerate(batches):
                batch["grpo"] = self._generate(batch, record_table=position == 0)
            if self.trainer.args.num_iterations > 1:  # kept for the next μ - 1 steps only
                self.cache = (ids, [batch["grpo"] for batch in batches])
        tokens = sum(batch["grpo"].completions.mask.sum() for batch in batches).reshape(1).float()
        if self.trainer.args.world_size > 1:
            tokens = self.trainer.accelerator.reduce(tokens, reduction="sum")
        self._generation_s = time.perf_counter() - start
        self._prepared_at = time.perf_counter()
        return batches, tokens.squeeze(0)

    def _generate(self, batch: dict, record_table: bool) -> GRPOMicroBatch:
        trainer, G = self.trainer, self.config.num_generations
        device = trainer.args.device
        model = trainer.model
        prompt_ids = [ids.to(device) for ids in batch["prompt_ids"]]
        pixel_values = batch.get("pixel_values")
        pixel_values = None if pixel_values is None else pixel_values.to(device)
        image_sizes = batch.get("image_sizes")
        image_sizes = None if image_sizes is None else image_sizes.to(device)
        image_counts = list(batch["image_counts"])
        tokens = [int((ids == unwrap(model).config.image_token_id).sum()) for ids in prompt_ids]
        start = time.perf_counter()
        with torch.no_grad(), trainer.accelerator.autocast():
            features = encode_images(model, pixel_values, image_sizes)
            with self.rng.active():
                completions = self.backend.generate(model, prompt_ids, features, self.sampling)
        self._sampling_s += time.perf_counter() - start
        texts = self.tokenizer.batch_decode(
            [ids[:n] for ids, n in zip(completions.ids, completions.lengths.tolist())],
            skip_special_tokens=True,
        )
        records = [record for record in batch["reward_records"] for _ in range(G)]
        total, parts = combined_rewards(self.reward_funcs, self.reward_weights, texts, records)
        rewards = torch.tensor(total, dtype=torch.float32, device=device)
        advantages, zero_std = group_advantages(rewards, G, self.config.scale_rewards)
        input_ids, attention_mask, labels = scoring_tensors(prompt_ids, completions, G, self.pad_id)
        mb = GRPOMicroBatch(
            list(batch["sample_ids"]),
            pixel_values,
            image_sizes,
            image_counts,
            tokens,
            completions,
            input_ids,
            attention_mask,
            labels,
            advantages,
        )
        if self._frozen_encoder(model):
            mb.features = repeat_rows(features, tokens, G)
        width = completions.ids.shape[1]
        with torch.no_grad(), trainer.accelerator.autocast():
            if trainer.args.num_iterations > 1:
                rows = mb.features if mb.features is not None else self._row_features(model, mb)
                mb.old_logps = self._logps(model, mb, rows, width)
            if self.ref_model is not None:
                rows = self._row_features(self.ref_model, mb)
                mb.ref_logps = self._logps(self.ref_model, mb, rows, width)
        self._record_generation(mb, rewards, parts, zero_std)
        if record_table:
            prompts = self.tokenizer.batch_decode(prompt_ids[:1], skip_special_tokens=True)
            for row in range(G):
                self.table.append(
                    {
                        "id": mb.sample_ids[0],
                        "prompt": prompts[0],
                        "completion": texts[row],
                        "rewards": {name: values[row] for name, values in parts.items()},
                        "reward": total[row],
                        "advantage": float(advantages[row]),
                    }
                )
        return mb

    def _logps(self, model, mb: GRPOMicroBatch, rows, width: int) -> torch.Tensor:
        return completion_logps(
            model, mb.input_ids, mb.attention_mask, mb.labels, rows, width, self.sampling.temperature
        )

    # ---- loss -----------------------------------------------------------------------------------
    def loss(self, model, inputs: dict, num_items_in_batch) -> torch.Tensor:
        mb: GRPOMicroBatch = inputs["grpo"]
        trainer = self.trainer
        with trainer.accelerator.autocast():
            rows = mb.features if mb.features is not None else self._row_features(model, mb)
            logps = self._logps(model, mb, rows, mb.completions.ids.shape[1])
        num_tokens = None
        if self.config.grpo_loss_type == "dapo" and num_items_in_batch is not None:
            num_tokens = num_items_in_batch / trainer.args.world_size
        loss, stats = grpo_loss(
            logps, mb.completions.mask, mb.advantages, self.config, mb.old_logps, mb.ref_logps, num_tokens
        )
        if model.training:
            if num_tokens is None:
                loss = loss / trainer.current_gradient_accumulation_steps
            for name, value in stats.items():
                trainer._metrics[name].append(float(value))
            trainer._throughput["samples"] += len(mb.sample_ids)
            trainer._throughput["tokens"] += int(mb.attention_mask.sum())
            trainer._throughput["computed"] += mb.attention_mask.numel()
        return loss

    # ---- logging and checkpoints --------------------------------------------------------------
    def _record_generation(
        self, mb: GRPOMicroBatch, rewards, parts: dict[str, list[float]], zero_std
    ) -> None:
        metrics = self.trainer._metrics
        for name, values in parts.items():
            values = torch.tensor(values)
            metrics[f"rewards/{name}/mean"].append(float(values.mean()))
            metrics[f"rewards/{name}/std"].append(float(values.std()))
        metrics["reward"].append(float(rewards.mean()))
        metrics["reward_std"].append(float(rewards.std()))
        metrics["frac_reward_zero_std"].append(float(zero_std.float().mean()))
        lengths = mb.completions.lengths.float()
        metrics["completions/mean_length"].append(float(lengths.mean()))
        metrics["completions/min_length"].append(float(lengths.min()))
        metrics["completions/max_length"].append(float(lengths.max()))
        last = mb.completions.ids.gather(1, (mb.completions.lengths - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        stopped = torch.isin(last, torch.tensor(self.backend.stop_ids, device=last.device))
        metrics["completions/clipped_ratio"].append(float((~stopped).float().mean()))

    def step_ended(self) -> None:
        metrics = self.trainer._metrics
        metrics["timing/generation_s"].append(self._generation_s)
        metrics["timing/sampling_s"].append(self._sampling_s)
        if self._prepared_at is not None:
            metrics["timing/train_s"].append(time.perf_counter() - self._prepared_at)

    def write_table(self, step: int) -> None:
        """Append the latest step's completions table to OUTPUT_DIR/completions.jsonl (main process)."""
        if not self.table or not self.trainer.is_world_process_zero():
            return
        path = Path(self.trainer.args.output_dir) / COMPLETIONS_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as handle:
            handle.writelines(json.dumps({"step": step, **row}) + "\n" for row in self.table)
        if "wandb" in self.trainer.args.report_to:
            import wandb

            if wandb.run is not None:
                columns = ["step", "id", "prompt", "completion", "reward", "advantage"]
                rows = [[step] + [row[c] for c in columns[1:]] for row in self.table]
                wandb.log({"completions": wandb.Table(columns=columns, data=rows)})
        self.table = []  # a reused generation (μ > 1) is not logged again

    def save(self, folder: str | Path) -> None:
        self.rng.save(folder)

    def load(self, folder: str | Path) -> None:
        self.rng.load(folder)
        self.cache = None
