"""The loss registry (llava/train/losses.py) against hand-written formulas on hand-picked numbers.

References are plain-`math` transcriptions of the papers' formulas (DPO: Rafailov et al. 2023 Eq. 7;
IPO: Azar et al. 2023 Eq. 17 with per-token-mean log ratios as in TRL; hinge: SLiC-HF; MPO:
InternVL-MPO's 0.8·DPO + 0.2·BCO-pair + 1.0·SFT with the in-batch mean reward as δ and the SFT term the
token-weighted NLL over all chosen tokens of the batch, as InternVL's CrossEntropyLoss; SFT: per-sample
token-mean NLL).
"""

from __future__ import annotations

import math

import pytest
import torch

from llava.train.losses import LOSSES, PREFERENCE_LOSSES, LossConfig, PairStats

# Two samples: sequence log-probs summed over tokens, and token counts.
POLICY_CHOSEN = [-3.0, -10.0]
POLICY_REJECTED = [-4.0, -8.0]
REF_CHOSEN = [-3.5, -9.0]
REF_REJECTED = [-3.0, -9.5]
CHOSEN_TOKENS = [2, 5]
REJECTED_TOKENS = [4, 3]


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def _logits(i: int) -> float:
    return (POLICY_CHOSEN[i] - POLICY_REJECTED[i]) - (REF_CHOSEN[i] - REF_REJECTED[i])


def ref_sft(i: int, beta: float) -> dict[str, float]:
    nll = -POLICY_CHOSEN[i] / CHOSEN_TOKENS[i]
    return {"total": nll, "sft": nll}


def ref_dpo(i: int, beta: float) -> dict[str, float]:
    loss = -_log_sigmoid(beta * _logits(i))
    return {"total": loss, "dpo": loss}


def ref_ipo(i: int, beta: float) -> dict[str, float]:
    chosen = (POLICY_CHOSEN[i] - REF_CHOSEN[i]) / CHOSEN_TOKENS[i]
    rejected = (POLICY_REJECTED[i] - REF_REJECTED[i]) / REJECTED_TOKENS[i]
    loss = (chosen - rejected - 1 / (2 * beta)) ** 2
    return {"total": loss, "ipo": loss}


def ref_hinge(i: int, beta: float) -> dict[str, float]:
    loss = max(0.0, 1 - beta * _logits(i))
    return {"total": loss, "hinge": loss}


def ref_mpo(i: int, beta: float) -> dict[str, float]:
    rewards_chosen = [beta * (p - r) for p, r in zip(POLICY_CHOSEN, REF_CHOSEN)]
    rewards_rejected = [beta * (p - r) for p, r in zip(POLICY_REJECTED, REF_REJECTED)]
    delta = sum(rewards_chosen + rewards_rejected) / (len(rewards_chosen) + len(rewards_rejected))
    bco = -_log_sigmoid(rewards_chosen[i] - delta) - _log_sigmoid(-(rewards_rejected[i] - delta))
    dpo = ref_dpo(i, beta)["dpo"]
    sft = -sum(POLICY_CHOSEN) / sum(CHOSEN_TOKENS)  # one number for the batch: 13 nats over 7 tokens
    return {"total": 0.8 * dpo + 0.2 * bco + 1.0 * sft, "dpo": dpo, "bco_pair": bco, "sft": sft}


def ref_dpo_sign_flipped(i: int, beta: float) -> dict[str, float]:
    loss = -_log_sigmoid(-beta * _logits(i))
    return {"total": loss, "dpo_sign_flipped": loss}


REFERENCES = {
    "sft": ref_sft,
    "dpo": ref_dpo,
    "ipo": ref_ipo,
    "hinge": ref_hinge,
    "mpo": ref_mpo,
    "dpo_sign_flipped": ref_dpo_sign_flipped,
}


def _stats(**overrides) -> PairStats:
    values = {
        "policy_chosen": torch.tensor(POLICY_CHOSEN),
        "policy_rejected": torch.tensor(POLICY_REJECTED),
        "ref_chosen": torch.tensor(REF_CHOSEN),
        "ref_rejected": torch.tensor(REF_REJECTED),
        "chosen_tokens": torch.tensor(CHOSEN_TOKENS),
        "rejected_tokens": torch.tensor(REJECTED_TOKENS),
    }
    values.update(overrides)
    return PairStats(**values)


def test_every_registered_loss_has_a_reference():
    assert set(REFERENCES) == set(LOSSES)
    assert set(LOSSES) - PREFERENCE_LOSSES == {"sft"}


@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_loss_matches_hand_written_formula(loss_type: str, beta: float):
    loss, parts = LOSSES[loss_type](_stats(), LossConfig(beta=beta))
    expected = [REFERENCES[loss_type](i, beta) for i in range(len(POLICY_CHOSEN))]
    assert loss.shape == (len(POLICY_CHOSEN),)
    torch.testing.assert_close(loss, torch.tensor([e["total"] for e in expected]), rtol=1e-6, atol=1e-6)
    assert set(parts) == set(expected[0]) - {"total"}
    for name, value in parts.items():
        torch.testing.assert_close(value, torch.tensor([e[name] for e in expected]), rtol=1e-6, atol=1e-6)


def test_hinge_is_zero_beyond_the_margin():
    # logits of sample 0 are 1.5 (> 1/β = 1 for β = 1): the hinge is inactive there, active for sample 1.
    loss, _ = LOSSES["hinge"](_stats(), LossConfig(beta=1.0))
    assert loss[0].item() == 0.0 and loss[1].item() > 0.0


def test_mpo_generation_term_is_token_weighted_over_the_batch():
    # 3 + 10 nats over 2 + 5 tokens: 13/7 ≈ 1.857, not the mean of the per-sample means (1.5 + 2.0) / 2.
    loss, parts = LOSSES["mpo"](_stats(), LossConfig(mpo_weights=(0.0, 0.0, 1.0)))
    assert loss.mean().item() == pytest.approx(13 / 7)
    assert parts["sft"].mean().item() == pytest.approx(13 / 7)


def test_mpo_weights_are_configurable():
    stats = _stats()
    only_dpo, _ = LOSSES["mpo"](stats, LossConfig(beta=0.1, mpo_weights=(1.0, 0.0, 0.0)))
    dpo, _ = LOSSES["dpo"](stats, LossConfig(beta=0.1))
    torch.testing.assert_close(only_dpo, dpo)


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_is_ln2_when_policy_equals_reference(beta: float):
    policy = _stats(ref_chosen=torch.tensor(POLICY_CHOSEN), ref_rejected=torch.tensor(POLICY_REJECTED))
    loss, _ = LOSSES["dpo"](policy, LossConfig(beta=beta))
    torch.testing.assert_close(loss, torch.full((2,), math.log(2.0)))
    chosen, rejected = policy.rewards(beta)
    assert torch.count_nonzero(chosen) == 0 and torch.count_nonzero(rejected) == 0


def test_dpo_gradient_matches_closed_form():
    # d/dπ_w of -log σ(β·logits) = -β·σ(-β·logits) (Rafailov et al. 2023, §4).
    beta = 0.5
    policy_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
    loss, _ = LOSSES["dpo"](_stats(policy_chosen=policy_chosen), LossConfig(beta=beta))
    loss.sum().backward()
    expected = [-beta / (1 + math.exp(beta * _logits(i))) for i in range(2)]
    torch.testing.assert_close(policy_chosen.grad, torch.tensor(expected))


@pytest.mark.parametrize("missing", ["policy_rejected", "ref_chosen", "ref_rejected"])
@pytest.mark.parametrize("loss_type", sorted(PREFERENCE_LOSSES))
def test_preference_loss_without_pairs_or_reference_raises(loss_type: str, missing: str):
    with pytest.raises(ValueError, match=missing):
        LOSSES[loss_type](_stats(**{missing: None}), LossConfig())


def test_sign_flipped_dpo_is_dpo_on_the_swapped_pair_and_pushes_the_other_way():
    stats = _stats()
    swapped = _stats(
        policy_chosen=stats.policy_rejected,
        policy_rejected=stats.policy_chosen,
        ref_chosen=stats.ref_rejected,
        ref_rejected=stats.ref_chosen,
    )
    flipped, _ = LOSSES["dpo_sign_flipped"](stats, LossConfig(beta=0.3))
    dpo_swapped, _ = LOSSES["dpo"](swapped, LossConfig(beta=0.3))
    torch.testing.assert_close(flipped, dpo_swapped)
    for name, sign in (("dpo", -1.0), ("dpo_sign_flipped", 1.0)):  # d loss / d log p(chosen)
        policy_chosen = torch.tensor(POLICY_CHOSEN, requires_grad=True)
        loss, _ = LOSSES[name](_stats(policy_chosen=policy_chosen), LossConfig(beta=0.3))
        loss.sum().backward()
        assert (torch.sign(policy_chosen.grad) == sign).all(), name


def test_sft_needs_only_the_chosen_side():
    stats = PairStats(torch.tensor(POLICY_CHOSEN), None, None, None, torch.tensor(CHOSEN_TOKENS), None)
    loss, _ = LOSSES["sft"](stats, LossConfig())
    torch.testing.assert_close(loss, torch.tensor([1.5, 2.0]))
