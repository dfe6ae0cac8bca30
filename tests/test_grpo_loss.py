"""llava.train.grpo against TRL 1.16's own `GRPOTrainer._compute_loss` on identical inputs.

TRL's method is called unbound with a minimal stand-in for the trainer whose per-token log-prob
function returns the test's tensor, so both sides see the same completions, log-probs, advantages and
reference log-probs; loss and gradient w.r.t. the log-probs must agree for every normalisation, with
and without KL, on-policy (μ = 1) and off-policy (μ = 2, old log-probs from before an update).
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from llava.train.grpo import NORMALISATIONS, GRPOConfig, group_advantages, grpo_loss

B, T, G, MAX_LEN = 8, 6, 4, 7


class _Accelerator:
    num_processes = 1

    @staticmethod
    def reduce(x, reduction="sum"):
        return x

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather


def _trl_loss(logps, inputs, cfg, ga_steps):
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=cfg.beta,
        loss_type=cfg.grpo_loss_type,
        epsilon_low=cfg.epsilon_low,
        epsilon_high=cfg.clip_high,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=ga_steps,
        max_completion_length=cfg.max_completion_length,
        accelerator=_Accelerator(),
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=ga_steps),
    )
    return GRPOTrainer._compute_loss(stand_in, None, inputs)


def _case(seed):
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = (torch.arange(T) < lengths.unsqueeze(1)).long()
    logps = -torch.rand(B, T, generator=gen) * 3
    rewards = torch.randint(0, 2, (B,), generator=gen).float()
    rewards[:G] = 1.0  # one zero-variance group
    old = logps + 0.3 * torch.randn(B, T, generator=gen)
    ref = logps + 0.5 * torch.randn(B, T, generator=gen)
    return mask, logps, rewards, old, ref


@pytest.mark.parametrize("loss_type", NORMALISATIONS)
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("num_iterations", [1, 2])
def test_matches_trl(loss_type, beta, num_iterations):
    cfg = GRPOConfig(
        num_generations=G,
        epsilon=0.2,
        epsilon_high=0.28,
        beta=beta,
        grpo_loss_type=loss_type,
        scale_rewards=loss_type != "dr_grpo",
        max_completion_length=MAX_LEN,
    )
    mask, base, rewards, old, ref = _case(seed=len(loss_type) + int(beta * 100) + num_iterations)
    advantages, zero = group_advantages(rewards, G, scale=cfg.scale_rewards)
    assert zero[0] and torch.isfinite(advantages).all()
    old_logps = None if num_iterations == 1 else old
    ga_steps = 2
    inputs = {
        "prompt_ids": torch.zeros(B, 1, dtype=torch.long),
        "prompt_mask": torch.ones(B, 1, dtype=torch.long),
        "completion_ids": torch.zeros(B, T, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "num_items_in_batch": mask.sum() * ga_steps,
    }
    if old_logps is not None:
        inputs["old_per_token_logps"] = old_logps
    if beta:
        inputs["ref_per_token_logps"] = ref
    theirs_logps = base.clone().requires_grad_(True)
    theirs = _trl_loss(theirs_logps, inputs, cfg, ga_steps)
    theirs.backward()

    ours_logps = base.clone().requires_grad_(True)
    # dapo: TRL's denominator is the step's tokens (both micro-batches); grpo/dr_grpo: caller divides by GA
    num_tokens = mask.sum() * ga_steps
    ours, stats = grpo_loss(ours_logps, mask, advantages, cfg, old_logps, ref if beta else None, num_tokens)
    if loss_type != "dapo":
        ours = ours / ga_steps
    ours.backward()
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(ours_logps.grad, theirs_logps.grad)
    assert ("kl" in stats) == bool(beta)


def test_on_policy_ratio_one_clipped_equals_unclipped():
    mask, base, rewards, _, _ = _case(seed=3)
    advantages, _ = group_advantages(rewards, G)
    grads = []
    for eps in (0.2, 1e6):  # 1e6: the clip never binds, i.e. the unclipped surrogate
        logps = base.clone().requires_grad_(True)
        loss, stats = grpo_loss(logps, mask, advantages, GRPOConfig(num_generations=G, epsilon=eps))
        loss.backward()
        assert stats["clip_ratio"] == 0
        grads.append(logps.grad)
    torch.testing.assert_close(grads[0], grads[1])
    # the on-policy gradient is −A / N per valid token (policy-gradient form)
    expected = -advantages.unsqueeze(1) * mask / mask.sum()
    torch.testing.assert_close(grads[0], expected)


def test_group_advantages_zero_variance_and_scale_free():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0])
    adv, zero = group_advantages(rewards, 4)
    assert zero.tolist() == [True, False] and torch.isfinite(adv).all()
    assert adv[:4].abs().max() == 0
    torch.testing.assert_close(adv[4:], torch.tensor([-1.0, 1.0, -1.0, 1.0]) * 0.5 / (0.5773503 + 1e-4))
    raw, _ = group_advantages(rewards * 10, 4, scale=False)
    torch.testing.assert_close(raw[4:], torch.tensor([-5.0, 5.0, -5.0, 5.0]))
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(rewards, 3)


def test_config_fails_fast():
    with pytest.raises(ValueError, match="grpo_loss_type"):
        GRPOConfig(grpo_loss_type="ppo")
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="needs reference"):
        grpo_loss(
            torch.zeros(2, 2), torch.ones(2, 2), torch.zeros(2), GRPOConfig(num_generations=2, beta=0.1)
        )
