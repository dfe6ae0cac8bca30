"""Grad-CAM under the GRPO loss (analysis/gradcam_grpo.py): the map is the gradient of the policy-gradient
loss of the sampled group, written by hand here, and a group without reward variance maps to zero."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis import gradcam as gc
from analysis import gradcam_grpo as gg
from analysis import gradcam_metrics as gm
from llava.data.records import PreferenceRecord
from llava.train.losses import LossConfig
from llava.train.rewards import REWARDS

GRID = 4  # tiny SigLIP: 32 px images, 8 px patches


@pytest.fixture(scope="module")
def square(tiny_dir):
    from llava.model.builder import ModelConfig, build_model

    return build_model(ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "siglip")))


def _record(tmp_path: Path) -> PreferenceRecord:
    from PIL import Image

    path = tmp_path / "image.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
    meta = {
        "answer": "red",
        "answer_format": "short",
        "answer_values": ["red", "blue"],
        "box": [8, 8, 24, 24],
    }
    return PreferenceRecord(
        "s/1", [str(path)], "<image>\nWhat colour is the circle?", "Red.", "Blue.", meta, "test.json"
    )


def _length_reward(completions: list[str], records: list[dict]) -> list[float]:
    return [float(len(c)) for c in completions]


def _hand_written_loss(model, group: gg.ScoredGroup, temperature: float):
    """Vision tokens A and the on-policy GRPO (DAPO-normalised) loss −Σ_i A_i Σ_t log π(t) / N as a function
    of A, through HF's own modules, the image repeated for every row (never llava.train's scoring)."""
    pixels = group.pixel_values.to(model.dtype)
    tokens = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1].detach()
    image_id = model.config.image_token_id
    mask = group.completions.mask.bool()

    def loss(a: torch.Tensor) -> torch.Tensor:
        visual = model.model.multi_modal_projector(a).reshape(-1, model.config.text_config.hidden_size)
        total = 0.0
        for row in range(group.input_ids.shape[0]):
            ids = group.input_ids[row : row + 1]
            embeds = model.get_input_embeddings()(ids).clone()
            embeds[ids == image_id] = visual
            hidden = model.model.language_model(
                inputs_embeds=embeds, attention_mask=group.attention_mask[row : row + 1]
            ).last_hidden_state
            logprobs = torch.log_softmax(model.lm_head(hidden[:, :-1]) / temperature, dim=-1)
            targets = group.labels[row : row + 1, 1:]
            valid = targets != -100
            picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            total = total + group.advantages[row] * (picked * valid).sum()
        return -total / mask.sum()

    return tokens, loss


def test_grpo_map_is_the_gradient_of_the_hand_written_policy_gradient_loss(square, tmp_path, monkeypatch):
    model, tokenizer, processor = square
    monkeypatch.setitem(REWARDS, "length", _length_reward)  # rewards that differ within the group
    cfg = gg.GRPOGradcamConfig(
        num_generations=4,
        max_completion_length=6,
        temperature=0.9,
        reward_funcs=("length",),
        reward_weights=None,
    )
    batch = gg.prompt_batch(_record(tmp_path), tokenizer, processor, model.config, "qwen_1_5", 512, "cpu")
    group = gg.GroupSampler(cfg, tokenizer, "qwen_1_5", "cpu").sample(model, batch)
    assert group.input_ids.shape[0] == 4 and len(set(group.rewards)) > 1
    assert group.advantages.abs().sum() > 0

    _, grad = gc.vision_token_gradient(model, {"group": group, "config": cfg}, "grpo", LossConfig(), None)
    ours = gm.token_grid(grad, model.config, (32, 32))
    tokens, loss_fn = _hand_written_loss(model, group, cfg.temperature)
    a = tokens.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(loss_fn(a), a)
    assert ours.shape == (GRID, GRID) and ours.sum() > 0
    np.testing.assert_allclose(
        ours, expected[0].norm(dim=-1).reshape(GRID, GRID).numpy(), rtol=1e-4, atol=1e-9
    )


def test_grpo_record_needs_its_answer_and_config_fails_fast(tmp_path):
    record = _record(tmp_path)
    assert gg.prompt_record(record).answer == "red"
    record.meta.pop("answer")
    with pytest.raises(Exception, match="s/1.*meta.answer"):
        gg.prompt_record(record)
    with pytest.raises(ValueError, match="reward_funcs"):
        gg.GRPOGradcamConfig(reward_funcs=("nope",))
    with pytest.raises(ValueError, match="reward_weights"):
        gg.GRPOGradcamConfig(reward_funcs=("format",), reward_weights=(1.0, 2.0))
    assert (
        gc.GradcamConfig(loss_types=("sft", "grpo"), learning_rates={"grpo": 1e-3}).learning_rate("grpo")
        == 1e-3
    )


def test_cli_maps_grpo_beside_sft_and_a_group_without_reward_variance_maps_to_zero(
    square, tmp_path, monkeypatch
):
    from llava.model.builder import save_model

    checkpoint = tmp_path / "ckpt"
    save_model(*square, checkpoint)
    record = _record(tmp_path)
    data = tmp_path / "dpo.json"
    row = {
        "id": record.id,
        "image": record.images[0],
        "prompt": record.prompt,
        "chosen": "Red.",
        "rejected": "Blue.",
    }
    data.write_text(json.dumps([{**row, "meta": record.meta}]))
    monkeypatch.setitem(REWARDS, "named_answer", lambda completions, records: [1.0] * len(completions))
    out = tmp_path / "out"
    gc.main(
        [
            "--checkpoint", str(checkpoint), "--data_path", str(data), "--out_dir", str(out),
            "--loss_types", "sft", "grpo", "--steps", "0", "1", "--learning_rates", "grpo=1e-3",
            "--reward_funcs", "named_answer", "--num_generations", "2", "--max_completion_length", "4",
        ]
    )  # fmt: skip
    rows = json.loads((out / "gradcam.json").read_text())["rows"]
    assert {(r["loss_type"], r["step"]) for r in rows} == {
        (loss, s) for loss in ("sft", "grpo") for s in (0, 1)
    }
    for r in rows:
        grid = np.load(out / r["map_npy"])
        if r["loss_type"] == "grpo":  # equal rewards: advantage 0, no gradient, no mass or entropy
            assert not grid.any() and r["mass_in_box"] is None and r["entropy"] is None
        else:
            assert grid.sum() > 0 and 0.0 <= r["mass_in_box"] <= 1.0
