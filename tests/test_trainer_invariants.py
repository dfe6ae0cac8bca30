"""Invariants of the one Stage-2 trainer (llava/train): matched samples (an order that follows the
sample ids, so runs whose record sets differ still share the order of the ids they share), shared image
encoding, per-module learning rates, batch 4×1 == 1×4 with accumulation, every registered loss end to
end (MPO's generation term against the model's own token-mean loss), and `--bf16` keeping fp32 weights.

Runs use the tiny presets and 12 MMPR pairs from the synthetic world (tests/train_fixtures.py).
"""

from __future__ import annotations

import json
import logging
import math

import pytest
import torch
import train_fixtures
from train_fixtures import build_components, make_trainer, max_abs_diff, run_main, train_argv, weights

from llava.train.logps import pair_logps
from llava.train.losses import LOSSES, PREFERENCE_LOSSES, LossConfig, PairStats
from llava.train.param_groups import check_deepspeed_config
from llava.train.sampling import MatchedSampler, matched_order, read_sample_order

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache

# ---- 2. matched samples ----------------------------------------------------------------------


@pytest.mark.slow
def test_sft_and_dpo_consume_identical_ids_in_identical_order(train_data, tmp_path):
    settings = {
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "num_train_epochs": 2,
        "max_steps": -1,
    }
    data = train_data.subset(8, tmp_path / "data")
    run_main(train_argv(data, tmp_path / "sft", "sft", **settings))
    run_main(train_argv(data, tmp_path / "dpo", "dpo", **settings))
    sft, dpo = read_sample_order(tmp_path / "sft"), read_sample_order(tmp_path / "dpo")
    assert sft == dpo

    n = len(data.ids)
    assert [row["step"] for row in sft] == list(range(1, 2 * n // 4 + 1))
    assert all(len(row["ids"]) == 4 for row in sft)
    flat = [i for row in sft for i in row["ids"]]
    first, second = flat[:n], flat[n:]
    assert sorted(first) == sorted(data.ids) == sorted(second), "every id once per epoch"
    assert first != second, "the sampler reshuffles per epoch"
    assert first != list(data.ids), "the order is shuffled"
    sampler = MatchedSampler(data.ids, seed=0)
    expected = []
    for epoch in range(2):
        sampler.set_epoch(epoch)
        expected += [data.ids[i] for i in sampler]
    assert flat == expected, "the trainer must draw batches from MatchedSampler"


IDS = [f"mmpr_{kind}/{line}" for kind in ("a", "b") for line in range(30)]


def _ordered(ids: list[str], seed: int = 0, epoch: int = 0) -> list[str]:
    return [ids[i] for i in matched_order(ids, seed, epoch)]


def test_matched_order_is_a_seeded_per_epoch_shuffle():
    orders = {(seed, epoch): _ordered(IDS, seed, epoch) for seed in (0, 1) for epoch in (0, 1)}
    assert all(sorted(order) == sorted(IDS) for order in orders.values()), "a permutation of the samples"
    assert len({tuple(order) for order in orders.values()}) == 4, "seed and epoch each change the order"
    assert orders[0, 0] != IDS
    assert _ordered(IDS, 0, 1) == orders[0, 1], "deterministic"


def test_matched_order_follows_the_ids_not_their_positions():
    reversed_ids = IDS[::-1]
    for epoch in (0, 1):
        assert _ordered(reversed_ids, epoch=epoch) == _ordered(IDS, epoch=epoch)


def test_dropping_records_keeps_the_relative_order_of_the_shared_ids():
    # e.g. --skip_invalid dropped, in the DPO run only, pairs whose rejected reply is too long.
    dropped = {IDS[3], IDS[17], IDS[40]}
    kept = [i for i in IDS if i not in dropped]
    for epoch in (0, 1, 2):
        assert _ordered(kept, epoch=epoch) == [i for i in _ordered(IDS, epoch=epoch) if i not in dropped]


def test_duplicate_ids_are_shuffled_apart():
    ids = IDS + IDS[:10]  # a mixture may list a record twice
    order = matched_order(ids, 0, 0)
    assert sorted(order) == list(range(len(ids)))
    positions = {n: order.index(n) for n in range(len(ids))}
    gaps = [abs(positions[n] - positions[n + len(IDS)]) for n in range(10)]
    assert max(gaps) > 1, "copies of one id must not always be drawn back to back"


def test_trainer_samples_by_id(train_data, tmp_path):
    trainer = make_trainer(train_data, tmp_path, loss_type="sft")
    sampler = trainer._get_train_sampler()
    assert sampler is trainer.matched_sampler and sampler.ids == list(train_data.ids)
    trainer.train_dataset.records.reverse()
    assert [trainer.train_dataset.ids[i] for i in trainer._get_train_sampler()] == [
        train_data.ids[i] for i in sampler
    ]


def test_skip_invalid_warns_that_the_other_run_must_skip_the_same_ids(train_data, tmp_path, caplog):
    from llava.model.builder import ModelConfig, build_model
    from llava.train.args import DataArguments, PivotTrainingArguments
    from llava.train.train import build_dataset

    _, tokenizer, image_processor = build_model(
        ModelConfig(llm=str(train_data.llm), vision_tower=str(train_data.vision_tower))
    )
    records = train_data.records("dpo")[:4]
    victim = records[1]["id"]
    records[1] = {**records[1], "rejected": " ".join(["a very long rejected answer"] * 400)}
    (tmp_path / "dpo.json").write_text(json.dumps(records))
    data_args = DataArguments(
        data_path=str(tmp_path / "dpo.json"),
        image_folder=str(train_data.world),
        model_max_length=1024,
        skip_invalid=True,
    )
    train_args = PivotTrainingArguments(
        output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", per_device_train_batch_size=1
    )
    config = build_components(train_data)[0].config
    with caplog.at_level(logging.WARNING, logger="llava.train.train"):
        dataset = build_dataset(data_args, train_args, tokenizer, image_processor, config)
    assert dataset.ids == [r["id"] for r in records if r["id"] != victim]
    warnings = [r.getMessage() for r in caplog.records if "must skip the same ids" in r.getMessage()]
    assert len(warnings) == 1 and "dropped 1 invalid record" in warnings[0]


# ---- 3. shared image encoding -----------------------------------------------------------------


@pytest.fixture(scope="module")
def pair_batch(train_data):
    model, _, dataset, collator = build_components(train_data)
    batch = collator([dataset[i] for i in range(3)])
    batch.pop("sample_ids")
    return model, batch


def _loss_and_grads(model, batch, loss_type: str, share: bool):
    model.zero_grad(set_to_none=True)
    chosen, rejected, n_chosen, n_rejected = pair_logps(model, batch, share_image_encoding=share)
    # A reference that differs from the policy, so every loss term has a non-trivial gradient.
    ref_chosen = chosen.detach() + torch.tensor([0.5, -1.0, 0.25])
    ref_rejected = rejected.detach() + torch.tensor([-0.5, 0.75, 1.0])
    stats = PairStats(chosen, rejected, ref_chosen, ref_rejected, n_chosen, n_rejected)
    loss = LOSSES[loss_type](stats, LossConfig(beta=0.5))[0].mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return (chosen.detach(), rejected.detach()), loss.detach(), grads


@pytest.mark.parametrize("loss_type", sorted(PREFERENCE_LOSSES))
def test_shared_image_encoding_matches_separate_encoding(pair_batch, loss_type: str):
    model, batch = pair_batch
    logps_shared, loss_shared, grads_shared = _loss_and_grads(model, batch, loss_type, share=True)
    logps_separate, loss_separate, grads_separate = _loss_and_grads(model, batch, loss_type, share=False)
    torch.testing.assert_close(logps_shared, logps_separate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_shared, loss_separate, rtol=1e-5, atol=1e-6)
    assert grads_shared.keys() == grads_separate.keys()
    assert any(".vision_tower." in name for name in grads_shared), "the tower must be trainable here"
    for name in grads_shared:
        assert grads_shared[name] is not None, name
        torch.testing.assert_close(grads_shared[name], grads_separate[name], rtol=1e-5, atol=1e-7, msg=name)
    tower_norm = sum(float(g.norm()) for n, g in grads_shared.items() if ".vision_tower." in n)
    assert tower_norm > 0, "the vision tower must receive a gradient"


def _count_tower_calls(model) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    calls = [0]

    def hook(module, inputs, output):
        calls[0] += 1

    return calls, model.model.vision_tower.register_forward_hook(hook)


@pytest.mark.parametrize(("share", "expected"), [(True, 1), (False, 2)])
def test_vision_tower_runs_once_per_pair_batch(pair_batch, share: bool, expected: int):
    model, batch = pair_batch
    calls, handle = _count_tower_calls(model)
    try:
        with torch.no_grad():
            pair_logps(model, batch, share_image_encoding=share)
    finally:
        handle.remove()
    assert calls[0] == expected


def test_training_step_encodes_images_once_for_policy_and_once_for_reference(train_data, tmp_path):
    trainer = make_trainer(train_data, tmp_path, loss_type="dpo", reference="live")
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    policy_calls, policy_handle = _count_tower_calls(trainer.model)
    ref_calls, ref_handle = _count_tower_calls(trainer.ref_model)
    try:
        trainer.model.train()
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=None)
    finally:
        policy_handle.remove()
        ref_handle.remove()
    assert (policy_calls[0], ref_calls[0]) == (1, 1)


# ---- 5. parameter groups ----------------------------------------------------------------------

LRS = {"vision": 2e-4, "projector": 5e-4, "llm": 1e-3}
LR_FLAGS = {
    "learning_rate": LRS["llm"],
    "mm_vision_tower_lr": LRS["vision"],
    "mm_projector_lr": LRS["projector"],
}


def _assert_groups(model, groups: list[dict], factor: float, weight_decay: float) -> None:
    tower = {id(p) for p in model.model.vision_tower.parameters() if p.requires_grad}
    projector = {id(p) for p in model.model.multi_modal_projector.parameters() if p.requires_grad}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    expected = {"vision": tower, "projector": projector, "llm": trainable - tower - projector}
    assert all(expected.values()), "every part must have trainable parameters in this setup"
    in_groups = [id(p) for group in groups for p in group["params"]]
    assert len(in_groups) == len(set(in_groups)), "a parameter sits in two groups"
    assert set(in_groups) == trainable, "the optimizer must hold exactly the trainable parameters"
    for part, ids in expected.items():
        lr = LRS[part] * factor
        got = {id(p) for g in groups if math.isclose(g["lr"], lr, rel_tol=1e-9) for p in g["params"]}
        assert got == ids, f"{part}: parameters with lr {lr} differ from the part's trainable parameters"
    for group in groups:
        dims = {p.ndim for p in group["params"]}
        assert group["weight_decay"] == (weight_decay if min(dims) >= 2 else 0.0), dims


def test_optimizer_groups_have_per_module_learning_rates(train_data, tmp_path):
    trainer = make_trainer(train_data, tmp_path, loss_type="sft", weight_decay=0.1, **LR_FLAGS)
    optimizer = trainer.create_optimizer()
    _assert_groups(trainer.model, optimizer.param_groups, factor=1.0, weight_decay=0.1)


@pytest.mark.slow
def test_per_module_learning_rates_follow_the_scheduler(train_data, tmp_path):
    # Linear warmup over 4 steps, stopped after 2: every group is at half its own learning rate.
    argv = train_argv(train_data, tmp_path, "dpo", max_steps=2, warmup_steps=4, weight_decay=0.1, **LR_FLAGS)
    trainer = run_main(argv)
    assert trainer.state.global_step == 2
    _assert_groups(trainer.model, trainer.optimizer.param_groups, factor=0.5, weight_decay=0.1)


def test_projector_only_trains_only_the_projector(train_data, tmp_path):
    trainer = make_trainer(train_data, tmp_path, mm_tunable_parts="mm_mlp_adapter", loss_type="dpo")
    before = weights(trainer.model)
    trainer.train()
    after = weights(trainer.model)
    projector = {n for n in before if "multi_modal_projector" in n}
    assert projector and all(not torch.equal(before[n], after[n]) for n in projector)
    changed = sorted(n for n in before if n not in projector and not torch.equal(before[n], after[n]))
    assert changed == []
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert trainable == projector


@pytest.mark.parametrize("as_file", [False, True])
def test_deepspeed_optimizer_block_with_module_lrs_raises(tmp_path, as_file: bool):
    config = {"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}
    without = {"zero_optimization": {"stage": 2}}
    if as_file:
        (tmp_path / "with.json").write_text(json.dumps(config))
        (tmp_path / "without.json").write_text(json.dumps(without))
        config, without = str(tmp_path / "with.json"), str(tmp_path / "without.json")
    with pytest.raises(ValueError, match="optimizer"):
        check_deepspeed_config(config, has_module_lrs=True)
    check_deepspeed_config(without, has_module_lrs=True)
    check_deepspeed_config(config, has_module_lrs=False)
    check_deepspeed_config(None, has_module_lrs=True)


def test_trainer_refuses_a_deepspeed_optimizer_block_with_module_lrs(train_data, tmp_path):
    block = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}
    with pytest.raises(ValueError, match="mm_vision_tower_lr"):
        make_trainer(train_data, tmp_path, deepspeed=block, loss_type="sft", mm_vision_tower_lr=1e-5)
    make_trainer(
        train_data, tmp_path, deepspeed={"zero_optimization": {"stage": 2}}, loss_type="sft", **LR_FLAGS
    )


# ---- 6. batch 4×1 == 1×4 with gradient accumulation -------------------------------------------


def _one_sgd_step(train_data, out, loss_type: str, batch: int, accumulation: int, **flags: object):
    argv = train_argv(
        train_data,
        out,
        loss_type,
        **flags,
        per_device_train_batch_size=batch,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        optim="sgd",
        learning_rate=1.0,
        lr_scheduler_type="constant",
        max_grad_norm=0,
    )
    return run_main(argv)


def _supervised_tokens(item: dict) -> int:
    return int((item["labels"][1:] != -100).sum())


@pytest.mark.slow
@pytest.mark.parametrize(("loss_type", "gamma"), [("sft", 0.0), ("dpo", 0.0), ("dpo", 1.0)])
def test_one_batch_of_4_equals_4_accumulated_batches_of_1(train_data, tmp_path, loss_type: str, gamma: float):
    flags = {"gamma": gamma} if gamma else {}
    big = _one_sgd_step(train_data, tmp_path / "4x1", loss_type, batch=4, accumulation=1, **flags)
    small = _one_sgd_step(train_data, tmp_path / "1x4", loss_type, batch=1, accumulation=4, **flags)
    step_ids = read_sample_order(tmp_path / "4x1")[0]["ids"]
    assert read_sample_order(tmp_path / "1x4")[0]["ids"] == step_ids
    if loss_type == "sft" or gamma:
        by_id = {item["id"]: item for item in (big.train_dataset[i] for i in range(len(big.train_dataset)))}
        lengths = {_supervised_tokens(by_id[i]) for i in step_ids}
        assert len(lengths) > 1, "the step's responses must differ in length for this test to bite"

    initial = weights(build_components(train_data, loss_type)[0])
    final_big, final_small = weights(big.model), weights(small.model)
    update = max_abs_diff(final_big, initial)
    assert update > 1e-3, "the SGD step must move the weights"
    assert max_abs_diff(final_big, final_small) < 1e-5 * max(update, 1.0)
    torch.testing.assert_close(final_big, final_small, rtol=1e-5, atol=1e-6)


# ---- 9. every loss end to end -------------------------------------------------------------------

LOSS_PARTS = {
    "sft": {"sft"},
    "dpo": {"dpo"},
    "ipo": {"ipo"},
    "hinge": {"hinge"},
    "mpo": {"dpo", "bco_pair", "sft"},
    "dpo_sign_flipped": {"dpo_sign_flipped"},
}
PAIR_METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def test_every_loss_has_expected_parts():
    assert set(LOSS_PARTS) == set(LOSSES)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", sorted(LOSSES))
def test_every_loss_trains_two_steps_and_logs_its_parts(train_data, tmp_path, loss_type: str):
    trainer = run_main(train_argv(train_data, tmp_path, loss_type, max_steps=2, reference="live"))
    steps = [log for log in trainer.state.log_history if "loss" in log]
    assert [log["step"] for log in steps] == [1, 2]
    for log in steps:
        parts = {key.removeprefix("loss/") for key in log if key.startswith("loss/")}
        assert parts == LOSS_PARTS[loss_type]
        assert all(math.isfinite(log[f"loss/{part}"]) for part in parts)
        assert math.isfinite(log["loss"]) and log["samples/s"] > 0 and log["tokens/s"] > 0
        assert log["logps/chosen"] < 0
        if loss_type in PREFERENCE_LOSSES:
            assert all(key in log for key in PAIR_METRICS)
            # Equal in exact arithmetic; the mean of differences and the difference of means round apart in float32.
            margin = log["rewards/chosen"] - log["rewards/rejected"]
            assert log["rewards/margins"] == pytest.approx(margin, rel=1e-5, abs=1e-6)
            assert 0.0 <= log["rewards/accuracies"] <= 1.0
            assert log["logps/rejected"] < 0
        else:
            assert not any(key.startswith("rewards/") for key in log)
    if loss_type == "dpo":
        first = steps[0]
        assert first["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
        assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0
        assert steps[1]["rewards/margins"] != 0.0, "after one step the policy differs from the reference"


def test_sft_loss_matches_the_models_own_causal_lm_loss(train_data, tmp_path):
    # HF's LlavaForConditionalGeneration loss is the token-mean NLL of the shifted labels: an independent
    # reference for the trainer's SFT normalisation in eval, in a step of known token count, and without one.
    trainer = make_trainer(train_data, tmp_path, loss_type="sft", gradient_accumulation_steps=2)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(3)])
    tokens = int((batch["labels"][:, 1:] != -100).sum())
    inputs = {k: v for k, v in batch.items() if k not in ("sample_ids", "image_sizes")}
    with torch.no_grad():
        model.eval()
        reference = model(**inputs).loss
        eval_loss = trainer.compute_loss(model, dict(batch))
        model.train()
        step_loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=torch.tensor(4 * tokens))
        fallback = trainer.compute_loss(model, dict(batch), num_items_in_batch=None)
    torch.testing.assert_close(eval_loss, reference)
    torch.testing.assert_close(step_loss, reference / 4)
    torch.testing.assert_close(fallback, reference / 2)


@pytest.mark.parametrize(
    "flags",
    [
        # InternVL's MPO generation term: one CrossEntropyLoss over every chosen token of the micro-batch.
        {"loss_type": "mpo", "mpo_weights": "0,0,1"},
        # LLaVA-NeXT's --gamma SFT term likewise (and TRL's `sft` term), with the DPO term weighted 0.
        {"loss_type": "dpo", "dpo_alpha": 0.0, "gamma": 1.0},
    ],
    ids=["mpo_generation", "gamma"],
)
def test_sft_terms_are_the_models_own_causal_lm_loss_of_the_chosen_side(train_data, tmp_path, flags):
    # HF's LlavaForConditionalGeneration loss over the chosen side's labels is token-weighted over the
    # batch, which differs from a mean over pairs of per-pair token means when reply lengths differ.
    trainer = make_trainer(train_data, tmp_path, **flags)
    model = trainer.model
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    assert len(set((batch["labels"][:, 1:] != -100).sum(dim=1).tolist())) > 1, "want replies of mixed lengths"
    inputs = {
        k: v for k, v in batch.items() if k not in ("sample_ids", "image_sizes") and "rejected" not in k
    }
    with torch.no_grad():
        model.eval()
        reference = model(**inputs).loss
        loss = trainer.compute_loss(model, dict(batch))
        stats = trainer._pair_stats(model, dict(batch), batch["sample_ids"])
    torch.testing.assert_close(loss, reference)
    assert abs(stats.chosen_nll.mean().item() - loss.item()) > 1e-4, "must differ from the mean over pairs"


def test_bf16_without_deepspeed_trains_fp32_weights(train_data, tmp_path):
    # HF's AdamW updates parameters in place: bf16 weights (~0.02) would drop most 1e-6 updates.
    argv = train_argv(train_data, tmp_path, "sft", max_steps=1, bf16=True, learning_rate=1e-6)
    trainer = run_main(argv)
    assert {p.dtype for p in trainer.model.parameters()} == {torch.float32}
    initial = weights(build_components(train_data, "sft")[0])
    final = weights(trainer.model)
    llm = [n for n in final if ".language_model." in n and final[n].ndim == 2]
    changed = sum(int((final[n] != initial[n]).sum()) for n in llm) / sum(final[n].numel() for n in llm)
    assert changed > 0.9, f"only {changed:.2f} of the LLM weights moved"


def test_evaluation_loss_is_not_scaled_by_accumulation(train_data, tmp_path):
    # Before training the policy is the reference, so the DPO eval loss is ln 2 whatever the accumulation.
    trainer = make_trainer(train_data, tmp_path, loss_type="dpo", gradient_accumulation_steps=4)
    metrics = trainer.evaluate(eval_dataset=trainer.train_dataset)
    assert metrics["eval_loss"] == pytest.approx(math.log(2.0), abs=1e-6)
