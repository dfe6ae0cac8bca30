"""Grad-CAM under the GRPO loss (issue 16): the gradient the vision tokens receive from on-policy GRPO.

The GRPO counterpart of the per-sample SFT and DPO losses of :mod:`analysis.gradcam` (paper Fig. 7; the
paper's appendix B compares GRPO with SFT), on the same preference records: a record's ``meta`` carries
the ground truth the GRPO json has (``answer``, ``answer_format`` and, from the synthetic world,
``answer_values``; llava.data.mmpr keeps every annotation key there), so one data file serves the three
losses. At every step of the Grad-CAM protocol the loss is the trainer's (``--loss_type grpo``,
llava.train.grpo_step) on that one prompt:

1. G completions are sampled from the current weights (llava.train.generation's HF backend, the image
   encoded once, temperature and length as ``GRPOGradcamConfig``), from a sampling RNG of its own seeded
   by ``seed`` (the global RNG is untouched, so SFT and DPO maps do not depend on GRPO being run);
2. they are rewarded (llava.train.rewards, ``reward_funcs`` with ``reward_weights``) and the advantages
   group-normalised (llava.train.grpo.group_advantages);
3. the completions are scored with gradient through one encoding of the image (the projector input is
   what analysis.gradcam captures) and the loss is the clipped surrogate, on-policy (ratio 1), without a
   KL term and with DAPO's token normalisation: ``scripts/train/grpo.sh``'s defaults.

A group whose rewards are all equal has advantage 0 and gives no gradient: its map is all zeros, and
analysis.gradcam leaves its mass in box and entropy empty (null), since GRPO learns nothing from it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PretrainedConfig, PreTrainedModel

from llava.data.collator import PromptCollator
from llava.data.dataset import MultimodalDataset
from llava.data.errors import RecordError
from llava.data.records import ANSWER_FORMATS, PreferenceRecord, PromptRecord
from llava.data.templates import get_template
from llava.model.image_tokens import image_token_counter
from llava.train.generation import (
    Completions,
    GenerationRNG,
    HFGenerationBackend,
    SamplingConfig,
    stop_token_ids,
)
from llava.train.grpo import GRPOConfig, group_advantages, grpo_loss
from llava.train.grpo_step import completion_logps, repeat_rows, scoring_tensors
from llava.train.logps import encode_images
from llava.train.rewards import REWARDS, combined_rewards

LOSS_TYPE = "grpo"


@dataclass(frozen=True)
class GRPOGradcamConfig:
    """How the GRPO loss of one sample is formed (flags of the same names as llava.train.args)."""

    num_generations: int = 8
    """Completions per step (the group)."""
    max_completion_length: int = 16
    """Longest completion, in tokens."""
    temperature: float = 1.0
    """Sampling temperature (the log-probs are those of the sampling distribution, as in training)."""
    reward_funcs: tuple[str, ...] = ("exact_match", "format")
    """Reward functions (llava.train.rewards.REWARDS)."""
    reward_weights: tuple[float, ...] | None = (1.0, 0.5)
    """Their weights (None: 1 each)."""
    seed: int = 0
    """Seed of the sampling RNG."""

    def __post_init__(self) -> None:
        SamplingConfig(self.num_generations, self.max_completion_length, self.temperature)
        unknown = [name for name in self.reward_funcs if name not in REWARDS]
        if unknown or not self.reward_funcs:
            raise ValueError(f"reward_funcs {list(self.reward_funcs)}: choose from {sorted(REWARDS)}")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"{len(self.reward_weights)} reward_weights for {len(self.reward_funcs)} reward_funcs"
            )

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(self.num_generations, self.max_completion_length, self.temperature)


@dataclass
class ScoredGroup:
    """One prompt's sampled group, ready to be scored with gradient."""

    pixel_values: torch.Tensor | None
    image_sizes: torch.Tensor | None
    image_tokens: list[int]
    completions: Completions
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    advantages: torch.Tensor
    rewards: list[float]


def prompt_record(record: PreferenceRecord) -> PromptRecord:
    """The GRPO prompt of a preference record, its ground truth read from ``meta`` (module docstring)."""
    answer = record.meta.get("answer")
    if answer is None or not str(answer).strip():
        raise RecordError(
            record.source,
            record.id,
            "GRPO Grad-CAM needs meta.answer (the ground truth the GRPO json carries; llava.data.mmpr keeps "
            "an annotation's `answer` in meta)",
        )
    answer_format = record.meta.get("answer_format", "short")
    if answer_format not in ANSWER_FORMATS:
        raise RecordError(
            record.source, record.id, f"meta.answer_format {answer_format!r}: not in {ANSWER_FORMATS}"
        )
    return PromptRecord(
        record.id,
        record.images,
        record.prompt,
        str(answer),
        answer_format,
        record.meta.get("box"),
        record.meta,
        record.source,
    )


def prompt_batch(
    record: PreferenceRecord,
    tokenizer,
    image_processor,
    config: PretrainedConfig,
    template: str,
    max_length: int,
    device: str | torch.device,
) -> dict[str, Any]:
    """The one-prompt batch the GRPO trainer would see for this record (PromptCollator's keys)."""
    dataset = MultimodalDataset(
        [prompt_record(record)], tokenizer, image_processor, template, image_token_counter(config), max_length
    )
    batch = PromptCollator()([dataset[0]])
    batch["prompt_ids"] = [ids.to(device) for ids in batch["prompt_ids"]]
    for key in ("pixel_values", "image_sizes"):
        if key in batch:
            batch[key] = batch[key].to(device)
    return batch


class GroupSampler:
    """Samples and rewards one prompt's group from the current weights (steps 1–2 of the docstring)."""

    def __init__(self, cfg: GRPOGradcamConfig, tokenizer, template: str, device: str | torch.device) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.backend = HFGenerationBackend(
            tokenizer.pad_token_id, stop_token_ids(tokenizer, get_template(template).reply_suffix)
        )
        self.rng = GenerationRNG(cfg.seed, 0, torch.device(device))

    def sample(self, model: PreTrainedModel, batch: dict[str, Any]) -> ScoredGroup:
        G = self.cfg.num_generations
        prompt_ids = batch["prompt_ids"]
        pixel_values, image_sizes = batch.get("pixel_values"), batch.get("image_sizes")
        tokens = [int((ids == model.config.image_token_id).sum()) for ids in prompt_ids]
        with torch.no_grad():
            features = encode_images(model, pixel_values, image_sizes)
            with self.rng.active():
                completions = self.backend.generate(model, prompt_ids, features, self.cfg.sampling)
        texts = self.tokenizer.batch_decode(
            [ids[:n] for ids, n in zip(completions.ids, completions.lengths.tolist())],
            skip_special_tokens=True,
        )
        records = [record for record in batch["reward_records"] for _ in range(G)]
        weights = list(self.cfg.reward_weights) if self.cfg.reward_weights is not None else None
        rewards, _ = combined_rewards(list(self.cfg.reward_funcs), weights, texts, records)
        advantages, _ = group_advantages(torch.tensor(rewards, device=completions.ids.device), G)
        input_ids, attention_mask, labels = scoring_tensors(
            prompt_ids, completions, G, self.tokenizer.pad_token_id
        )
        return ScoredGroup(
            pixel_values,
            image_sizes,
            tokens,
            completions,
            input_ids,
            attention_mask,
            labels,
            advantages,
            rewards,
        )


def group_loss(model: PreTrainedModel, group: ScoredGroup, cfg: GRPOGradcamConfig) -> torch.Tensor:
    """The trainer's GRPO loss of one group, the image encoded once with gradient (step 3)."""
    G = cfg.num_generations
    rows = repeat_rows(encode_images(model, group.pixel_values, group.image_sizes), group.image_tokens, G)
    width = group.completions.ids.shape[1]
    logps = completion_logps(
        model, group.input_ids, group.attention_mask, group.labels, rows, width, cfg.temperature
    )
    config = GRPOConfig(num_generations=G, max_completion_length=cfg.max_completion_length)
    loss, _ = grpo_loss(logps, group.completions.mask, group.advantages, config)
    return loss


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The GRPO flags of ``python -m analysis.gradcam`` (used when ``--loss_types`` names grpo)."""
    default = GRPOGradcamConfig()
    parser.add_argument(
        "--num_generations", type=int, default=default.num_generations, help="GRPO: completions per step"
    )
    parser.add_argument(
        "--max_completion_length",
        type=int,
        default=default.max_completion_length,
        help="GRPO: longest completion in tokens",
    )
    parser.add_argument(
        "--temperature", type=float, default=default.temperature, help="GRPO: sampling temperature"
    )
    parser.add_argument(
        "--reward_funcs",
        nargs="+",
        default=list(default.reward_funcs),
        help=f"GRPO: reward functions, from {sorted(REWARDS)}",
    )
    parser.add_argument(
        "--reward_weights",
        nargs="+",
        type=float,
        help=f"GRPO: their weights (default {list(default.reward_weights)} for the default functions, else 1 each)",
    )
    parser.add_argument("--grpo_seed", type=int, default=default.seed, help="GRPO: seed of the sampling RNG")


def config_from_args(args: argparse.Namespace) -> GRPOGradcamConfig:
    default = GRPOGradcamConfig()
    weights = args.reward_weights
    if weights is None and tuple(args.reward_funcs) == default.reward_funcs:
        weights = default.reward_weights
    return GRPOGradcamConfig(
        num_generations=args.num_generations,
        max_completion_length=args.max_completion_length,
        temperature=args.temperature,
        reward_funcs=tuple(args.reward_funcs),
        reward_weights=None if weights is None else tuple(weights),
        seed=args.grpo_seed,
    )
