"""GPU-only checks of issue 9 (skipped cleanly without CUDA): bf16 against fp32 on a tiny model, the
flash-attention path, and ZeRO-3 runs with DeepSpeed (save, export, parameter groups).

The ZeRO-3 checks are the CPU ones of tests/test_distributed.py run on CUDA, with 2 processes when 2
GPUs are present (one process otherwise, as `torchrun --nproc_per_node 1`).
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import train_fixtures
from test_distributed import (
    HAS_DEEPSPEED,
    check_zero3_parameter_groups,
    check_zero3_run,
    checkpoint,  # noqa: F401 (module fixture: the tiny MLLM saved as a checkpoint)
    log_history,
    torchrun,
    zero3_argv,
)
from train_fixtures import build_components, run_main, train_argv

from llava.model.builder import default_attn_implementation
from llava.train.logps import chosen_logps, pair_logps

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]
HAS_FLASH_ATTN = importlib.util.find_spec("flash_attn") is not None
needs_deepspeed = pytest.mark.skipif(not HAS_DEEPSPEED, reason="deepspeed is not installed (GPU extra)")


def gpu_argv(*args, **flags) -> list[str]:
    return [a for a in train_argv(*args, **flags) if a != "--use_cpu"]


def _batch(data, kind: str):
    model, tokenizer, dataset, collator = build_components(data, kind)
    batch = collator([dataset[i] for i in range(4)])
    batch.pop("sample_ids")
    return model, {k: v.cuda() if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def test_bf16_log_probs_match_fp32(train_data):
    model, batch = _batch(train_data, "dpo")
    model = model.cuda().eval()
    fp32 = pair_logps(model, batch)
    fp32_sft, counts = chosen_logps(model, batch)
    model = model.to(torch.bfloat16)
    bf16 = pair_logps(model, batch)
    bf16_sft, _ = chosen_logps(model, batch)
    for a, b in zip(fp32[:2], bf16[:2]):
        assert torch.allclose(a, b.float(), rtol=2e-2), (a, b)
    sft_loss = lambda logps: -(logps.sum() / counts.sum())  # noqa: E731 (token-mean NLL)
    assert sft_loss(bf16_sft).item() == pytest.approx(sft_loss(fp32_sft).item(), rel=1e-2)


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sft", "dpo"])
def test_bf16_training_loss_matches_fp32(train_data, tmp_path, loss_type: str):
    flags = {"max_steps": 3, "learning_rate": 1e-3}
    run_main(gpu_argv(train_data, tmp_path / "fp32", loss_type, **flags))
    run_main(gpu_argv(train_data, tmp_path / "bf16", loss_type, bf16=True, **flags))
    fp32 = [row["loss"] for row in log_history(tmp_path / "fp32") if "loss" in row]
    bf16 = [row["loss"] for row in log_history(tmp_path / "bf16") if "loss" in row]
    assert len(fp32) == len(bf16) == 3
    assert bf16[0] == pytest.approx(fp32[0], rel=1e-2), "same weights at step 1: only the precision differs"
    assert bf16 == pytest.approx(fp32, rel=3e-2)


@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash_attn is not installed")
@torch.no_grad()
def test_flash_attention_is_the_default_and_matches_sdpa_on_padded_pairs(train_data, tmp_path):
    from llava.model.builder import ModelConfig, build_model, load_model, save_model

    assert default_attn_implementation("bfloat16") == "flash_attention_2"
    assert default_attn_implementation("float32") == "sdpa", "flash-attn has no fp32 kernels"
    model, tokenizer, image_processor = build_model(
        ModelConfig(llm=str(train_data.llm), vision_tower=str(train_data.vision_tower), dtype="bfloat16")
    )
    assert model.config.text_config._attn_implementation == "flash_attention_2"
    save_model(model, tokenizer, image_processor, tmp_path)
    reloaded = load_model(tmp_path, dtype="bfloat16")[0]
    assert reloaded.config.text_config._attn_implementation == "flash_attention_2"
    _, batch = _batch(train_data, "dpo")
    assert (batch["attention_mask"] == 0).any(), "the pairs must be padded to test the varlen path"
    model = model.cuda().eval()
    flash = pair_logps(model, batch)
    model.set_attn_implementation({"text_config": "sdpa"})
    sdpa = pair_logps(model, batch)
    for a, b in zip(flash[:2], sdpa[:2]):
        assert torch.allclose(a.float(), b.float(), rtol=2e-2), (a, b)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_FLASH_ATTN, reason="flash_attn is not installed")
def test_bf16_dpo_training_runs_on_flash_attention(train_data, tmp_path):
    trainer = run_main(gpu_argv(train_data, tmp_path, "dpo", bf16=True, max_steps=2))
    assert trainer.model.config.text_config._attn_implementation == "flash_attention_2"
    losses = [row["loss"] for row in log_history(tmp_path) if "loss" in row]
    assert len(losses) == 2 and all(loss == loss and loss < 10 for loss in losses)


# ---- ZeRO-3 ----------------------------------------------------------------------------------------------
def _nproc() -> int:
    return min(2, torch.cuda.device_count())


@pytest.mark.slow
@needs_deepspeed
def test_zero3_sft_save_and_export(train_data, checkpoint, tmp_path):  # noqa: F811
    check_zero3_run(train_data, checkpoint, tmp_path, "sft", cpu=False, nproc=_nproc())


@pytest.mark.slow
@needs_deepspeed
def test_zero3_bf16_sft_runs_like_fp32(train_data, checkpoint, tmp_path):  # noqa: F811
    from test_distributed import from_checkpoint

    flags = {"max_steps": 3, "learning_rate": 1e-3, "per_device_train_batch_size": 4 // (2 * _nproc())}
    bf16 = zero3_argv(
        train_data, tmp_path / "bf16", "sft", cpu=False, bf16=True, gradient_accumulation_steps=2, **flags
    )
    torchrun(from_checkpoint(bf16, checkpoint), nproc=_nproc())
    fp32 = zero3_argv(train_data, tmp_path / "fp32", "sft", cpu=False, gradient_accumulation_steps=2, **flags)
    torchrun(from_checkpoint(fp32, checkpoint), nproc=_nproc())
    losses = [
        [row["loss"] for row in log_history(tmp_path / run) if "loss" in row] for run in ("bf16", "fp32")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=3e-2)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_dpo_with_precomputed_reference(train_data, checkpoint, tmp_path):  # noqa: F811
    check_zero3_run(train_data, checkpoint, tmp_path, "dpo", cpu=False, nproc=_nproc())


@pytest.mark.slow
@needs_deepspeed
def test_zero3_keeps_parameter_groups(checkpoint, tmp_path):  # noqa: F811
    check_zero3_parameter_groups(checkpoint, tmp_path, cpu=False)


@pytest.mark.slow
@needs_deepspeed
def test_zero3_builds_from_llm_and_vision_tower(train_data, tmp_path):
    torchrun(zero3_argv(train_data, tmp_path, "sft", cpu=False, max_steps=1), nproc=_nproc())
