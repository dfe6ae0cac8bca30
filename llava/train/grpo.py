"""GRPO objective: group-normalised advantages and the clipped surrogate with an optional k3 KL term.

Follows DeepSeekMath's GRPO (Shao et al. 2024) with the loss normalisations named as TRL's `loss_type`:
- `grpo`: each completion's token-mean loss, averaged over completions (the GRPO paper);
- `dapo`: token-level, the sum over every completion token of the optimizer step divided by their
  number (DAPO, Yu et al. 2025), so long completions are not down-weighted;
- `dr_grpo`: the token sum divided by (completions × `max_completion_length`), a constant (Dr. GRPO,
  Liu et al. 2025); pair it with `scale_rewards=False` (no std division of the advantages).

Per token t of completion i: ratio ρ = exp(log πθ − log π_old), surrogate −min(ρ·A_i, clip(ρ, 1−ε_low,
1+ε_high)·A_i), plus β·KL with the k3 estimator exp(r − l) − (r − l) − 1 (r = log π_ref, l = log πθ).
With `num_iterations` μ = 1 the old policy is the current one (π_old = πθ detached, ρ = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NORMALISATIONS = ("grpo", "dapo", "dr_grpo")
ADVANTAGE_EPS = 1e-4  # TRL's, so zero-variance groups give advantage 0, never NaN


@dataclass
class GRPOConfig:
    """Hyper-parameters of the objective (flags of the same names in llava.train.args)."""

    num_generations: int = 8
    epsilon: float = 0.2
    epsilon_high: float | None = None
    beta: float = 0.0
    grpo_loss_type: str = "dapo"
    scale_rewards: bool = True
    max_completion_length: int = 256

    def __post_init__(self) -> None:
        if self.grpo_loss_type not in NORMALISATIONS:
            raise ValueError(f"grpo_loss_type {self.grpo_loss_type!r}: choose one of {NORMALISATIONS}.")
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be ≥ 2 (a group needs a baseline), got {self.num_generations}."
            )
        if self.epsilon <= 0 or (self.epsilon_high is not None and self.epsilon_high <= 0):
            raise ValueError("epsilon and epsilon_high must be > 0.")
        if self.beta < 0:
            raise ValueError(f"beta must be ≥ 0, got {self.beta}.")
        if self.max_completion_length < 1:
            raise ValueError("max_completion_length must be ≥ 1.")

    @property
    def epsilon_low(self) -> float:
        return self.epsilon

    @property
    def clip_high(self) -> float:
        return self.epsilon if self.epsilon_high is None else self.epsilon_high


def group_advantages(
    rewards: torch.Tensor, num_generations: int, scale: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [B], zero-variance flag per group [B / G]) for rewards ordered group by group.

    A = r − mean(group), divided by (std(group) + 1e-4) when `scale` (unbiased std, as TRL).
    """
    if rewards.numel() % num_generations:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {num_generations}.")
    groups = rewards.view(-1, num_generations)
    std = groups.std(dim=1)
    advantages = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        advantages = advantages / (std.unsqueeze(1) + ADVANTAGE_EPS)
    return advantages.reshape(-1), torch.isclose(std, torch.zeros_like(std))


def grpo_loss(
    logps: torch.Tensor,
    mask: torch.Tensor,
    advantages: torch.Tensor,
    config: GRPOConfig,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    num_tokens: float | torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one micro-batch of completions and its logging stats.

    logps, old_logps, ref_logps, mask: [B, T] per completion token; advantages: [B]. `num_tokens` is the
    `dapo` denominator (the optimizer step's completion tokens, default this micro-batch's); the caller
    divides `grpo`/`dr_grpo` by the accumulation steps as for every loss.
    """
    mask = mask.to(logps.dtype)
    old = logps.detach() if old_logps is None else old_logps
    ratio = torch.exp(logps - old)
    clipped = torch.clamp(ratio, 1 - config.epsilon_low, 1 + config.clip_high)
    adv = advantages.unsqueeze(1)
    per_token = -torch.min(ratio * adv, clipped * adv)
    stats: dict[str, torch.Tensor] = {}
    if config.beta:
        if ref_logps is None:
            raise ValueError("beta > 0 needs reference log-probs.")
        diff = ref_logps - logps
        kl = torch.exp(diff) - diff - 1
        per_token = per_token + config.beta * kl
        stats["kl"] = (kl * mask).sum().detach() / mask.sum().clamp(min=1)
    if config.grpo_loss_type == "grpo":
        loss = ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    elif config.grpo_loss_type == "dapo":
        denominator = mask.sum() if num_tokens is None else num_tokens
        loss = (per_token * mask).sum() / torch.as_tensor(denominator, dtype=logps.dtype).clamp(min=1)
    else:
        loss = (per_token * mask).sum() / (per_token.shape[0] * config.max_completion_length)
    low = (ratio < 1 - config.epsilon_low) & (adv < 0)
    high = (ratio > 1 + config.clip_high) & (adv > 0)
    stats["clip_ratio"] = ((low | high).to(mask.dtype) * mask).sum().detach() / mask.sum().clamp(min=1)
    return loss, stats
