"""Loss registry for the one Stage-2 trainer: SFT and the preference losses (DPO, IPO, hinge, MPO).

It also holds one control that is not a method: ``dpo_sign_flipped``, DPO with the sign of its logits
flipped (it prefers the rejected response). The miniature demo (scripts/demo.sh, DEMO_CONTROLS=1)
trains it next to DPO so the report shows what a broken preference loss looks like; never use it to
train a model you want.

Every loss takes a `PairStats` (per-sample log-probabilities of the chosen/rejected responses under
the policy and the reference, and token counts) and returns `(per-sample loss [B], parts)` where
`parts` maps a name ("dpo", "sft", ...) to its per-sample value, for logging; the trainer optimises
the mean over the micro-batch. The trainer adds the optional SFT term `gamma * NLL(chosen)` to any
preference loss (PIVOT/LLaVA-NeXT's `dpo_alpha`, `gamma`): the NLL of every chosen token of the optimizer
step divided by their number (token-weighted, as LLaVA-NeXT's one CrossEntropyLoss over all chosen tokens
and TRL's `sft` term), exactly the SFT loss. Adding a loss is one function and one entry in `LOSSES`.

Notation: `logits = (log πθ(y_w|x) - log πθ(y_l|x)) - (log πref(y_w|x) - log πref(y_l|x))` with
sequence log-probabilities summed over response tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class PairStats:
    """Per-sample statistics of a batch of (prompt, chosen, rejected) triples; all tensors [B]."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor | None
    ref_chosen: torch.Tensor | None
    ref_rejected: torch.Tensor | None
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor | None
    bco_delta: float | None = None  # MPO's BCO shift from the trainer's running mean; None: in-batch mean

    @property
    def chosen_nll(self) -> torch.Tensor:
        """Mean negative log-likelihood per chosen token, per sample."""
        return -self.policy_chosen / self.chosen_tokens.clamp(min=1)

    @property
    def batch_chosen_nll(self) -> torch.Tensor:
        """Mean negative log-likelihood per chosen token over the whole batch (token-weighted), a scalar."""
        return -self.policy_chosen.sum() / self.chosen_tokens.sum().clamp(min=1)

    def require_pairs(self, loss_type: str) -> None:
        missing = [
            name for name in ("policy_rejected", "ref_chosen", "ref_rejected") if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(
                f"loss_type={loss_type!r} needs rejected responses and reference log-probs; missing {missing}."
            )

    def logits(self) -> torch.Tensor:
        return (self.policy_chosen - self.policy_rejected) - (self.ref_chosen - self.ref_rejected)

    def rewards(self, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Implicit DPO rewards β·log(πθ/πref) of chosen and rejected (detached)."""
        chosen = beta * (self.policy_chosen - self.ref_chosen).detach()
        rejected = beta * (self.policy_rejected - self.ref_rejected).detach()
        return chosen, rejected


@dataclass(frozen=True)
class LossConfig:
    """Hyperparameters shared by the losses (defaults: PIVOT's Stage 2 and InternVL's MPO)."""

    beta: float = 0.1
    mpo_weights: tuple[float, float, float] = (0.8, 0.2, 1.0)  # (preference, quality, generation)


def sft_loss(stats: PairStats, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Supervised fine-tuning: NLL of the chosen response (Ouyang et al. 2022 SFT stage).

    Per sample this is the token-mean NLL; the trainer normalises by the number of chosen tokens in
    the whole optimizer step instead, so long and short responses weigh per token as in HF's SFT.
    """
    return stats.chosen_nll, {"sft": stats.chosen_nll}


def dpo_loss(stats: PairStats, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO, sigmoid form: -log σ(β·logits) (Rafailov et al. 2023, Eq. 7)."""
    stats.require_pairs("dpo")
    loss = -F.logsigmoid(cfg.beta * stats.logits())
    return loss, {"dpo": loss}


def dpo_sign_flipped_loss(stats: PairStats, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CONTROL, not a method: DPO with the sign of its logits flipped, -log σ(-β·logits).

    It is DPO on the swapped pair (rejected preferred over chosen), so a run trained with it moves the
    model towards the plausible-but-wrong answers; the demo's report uses it to show that a sign error
    in the preference loss is visible in the measured numbers.
    """
    stats.require_pairs("dpo_sign_flipped")
    loss = -F.logsigmoid(-cfg.beta * stats.logits())
    return loss, {"dpo_sign_flipped": loss}


def ipo_loss(stats: PairStats, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO: (h - 1/(2β))² (Azar et al. 2023, Eq. 17), with τ = β.

    h uses length-normalised (per-token mean) log-probabilities, as TRL does following the authors'
    recommendation; the sum form over-weights long responses under a squared loss.
    """
    stats.require_pairs("ipo")
    chosen = (stats.policy_chosen - stats.ref_chosen) / stats.chosen_tokens.clamp(min=1)
    rejected = (stats.policy_rejected - stats.ref_rejected) / stats.rejected_tokens.clamp(min=1)
    loss = (chosen - rejected - 1.0 / (2.0 * cfg.beta)) ** 2
    return loss, {"ipo": loss}


def hinge_loss(stats: PairStats, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Hinge / SLiC-HF calibration loss: max(0, 1 - β·logits) (Zhao et al. 2023, Eq. 3 with δ = 1/β)."""
    stats.require_pairs("hinge")
    loss = torch.relu(1.0 - cfg.beta * stats.logits())
    return loss, {"hinge": loss}


def batch_reward_mean(stats: PairStats, cfg: LossConfig) -> torch.Tensor:
    """Mean implicit reward β·log(πθ/πref) over the batch's chosen and rejected responses (detached)."""
    return torch.cat(stats.rewards(cfg.beta)).mean()


def bco_pair_loss(stats: PairStats, cfg: LossConfig) -> torch.Tensor:
    """BCO (Jung et al. 2024, Eq. 9) on pairs: -log σ(r_w - δ) - log σ(-(r_l - δ)), r = β·log(πθ/πref).

    δ is the reward shift of BCO and of InternVL's MPO, whose trainer (on TRL 0.10) subtracts TRL's
    `RunningMoments` running mean of the micro-batch mean rewards across steps (TRL 1.16's own
    `bco_pair` uses no δ at all). The trainer keeps that running mean (`--bco_delta running`, the
    default; llava.train.running_mean) and passes it as `stats.bco_delta`; with `--bco_delta batch`
    (or when called without one) δ is the mean reward of this batch (chosen and rejected, detached).
    """
    chosen = cfg.beta * (stats.policy_chosen - stats.ref_chosen)
    rejected = cfg.beta * (stats.policy_rejected - stats.ref_rejected)
    delta = torch.cat([chosen, rejected]).detach().mean() if stats.bco_delta is None else stats.bco_delta
    return -F.logsigmoid(chosen - delta) - F.logsigmoid(-(rejected - delta))


def mpo_loss(stats: PairStats, cfg: LossConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """MPO: w_p·L_DPO + w_q·L_BCO + w_g·L_SFT (Wang et al. 2024, InternVL-MPO, Eq. 2; weights 0.8/0.2/1).

    L_SFT is the token-weighted mean NLL over every chosen token of the micro-batch, as InternVL's
    trainer computes it (one `CrossEntropyLoss` over the chosen rows) and TRL's `sft` loss type; it is
    given to every sample, so the mean over the micro-batch is exactly that number.
    """
    stats.require_pairs("mpo")
    w_p, w_q, w_g = cfg.mpo_weights
    preference = -F.logsigmoid(cfg.beta * stats.logits())
    quality = bco_pair_loss(stats, cfg)
    generation = stats.batch_chosen_nll.expand_as(preference)
    loss = w_p * preference + w_q * quality + w_g * generation
    return loss, {"dpo": preference, "bco_pair": quality, "sft": generation}


LossFn = Callable[[PairStats, LossConfig], tuple[torch.Tensor, dict[str, torch.Tensor]]]

LOSSES: dict[str, LossFn] = {
    "sft": sft_loss,
    "dpo": dpo_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "mpo": mpo_loss,
    "dpo_sign_flipped": dpo_sign_flipped_loss,  # a control for the demo's report, not a training method
}

PREFERENCE_LOSSES = frozenset(name for name in LOSSES if name != "sft")
ONLINE_LOSSES = frozenset({"grpo"})  # sampled completions, no fixed responses (llava.train.grpo_step)
LOSS_TYPES = frozenset(LOSSES) | ONLINE_LOSSES
