"""The throughput benchmark's FLOP counter (benchmarks/throughput.py) and the paper configs it counts
(llava/model/paper_configs.py).

References: a hand count written out for a tiny config; torch's `FlopCounterMode` measuring the real
forward and backward of a tiny MLLM; the Linear layers of the real-size models built on the meta device;
the parameter counts published on the Qwen2.5 model cards.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from llava.data.collator import DataCollator
from llava.model.paper_configs import (
    IMAGE_TOKENS,
    LLM_CONFIGS,
    VISION_CONFIGS,
    build_model_from_configs,
    describe,
    llm_config,
    vision_config,
)
from llava.train.logps import pair_logps

_SPEC = importlib.util.spec_from_file_location(
    "throughput", Path(__file__).resolve().parents[1] / "benchmarks" / "throughput.py"
)
throughput = importlib.util.module_from_spec(_SPEC)
sys.modules["throughput"] = throughput  # dataclasses look their module up while the file executes
_SPEC.loader.exec_module(throughput)

TINY_LLM = {
    "model_type": "qwen2",
    "vocab_size": 1100,
    "hidden_size": 48,
    "intermediate_size": 80,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
}
TINY_VISION = {
    "image_size": 32,
    "patch_size": 8,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 3,
    "num_attention_heads": 2,
}
SHAPE = {"prompt_tokens": 5, "response_tokens": 7}


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    model, tokenizer, _ = build_model_from_configs(TINY_LLM, TINY_VISION)
    model.set_attn_implementation("eager")  # attention as explicit matmuls, which FlopCounterMode sees
    return model, tokenizer


def test_hand_count_of_a_tiny_config(tiny_model):
    model, _ = tiny_model
    shape = throughput.SampleShape(16, **SHAPE)  # 32 px / patch 8 → 4×4 = 16 image tokens
    # Vision: 16 patches, d 32, d_ff 64, 2 layers used (select -2 of 3): patch embed 2·16·(3·8·8)·32,
    # per layer 2·16·(4·32² + 2·32·64) + 4·16²·32.
    vision = 2 * 16 * 192 * 32 + 2 * (2 * 16 * (4 * 1024 + 4096) + 4 * 256 * 32)
    # Projector 32 → 48 → 48 on 16 tokens.
    projector = 2 * 16 * (32 * 48 + 48 * 48)
    # LLM: s = 16 + 5 + 7 = 28; head_dim 12; q 48·48, k and v 48·24 each, o 48·48, MLP 3·48·80;
    # attention 4·28²·48 per layer; LM head 2·7·48·1100 at the 7 supervised positions.
    per_layer = 2 * 28 * (48 * 48 + 2 * 48 * 24 + 48 * 48 + 3 * 48 * 80) + 4 * 28 * 28 * 48
    llm = 2 * per_layer + 2 * 7 * 48 * 1100
    assert model.config.vision_config.num_hidden_layers == 2
    assert throughput.vision_forward_flops(model.config.vision_config) == vision
    assert throughput.projector_forward_flops(16, 32, 48) == projector
    assert throughput.llm_forward_flops(model.config.text_config, 28, 7) == llm
    sft = throughput.step_flops(model.config, shape, "sft")
    assert sft == {
        "vision": 3 * vision,
        "projector": 3 * projector,
        "llm": 3 * llm,
        "reference": 0,
        "total": 3 * (vision + projector + llm),
    }
    dpo = throughput.step_flops(model.config, shape, "dpo", "precomputed")
    assert dpo["llm"] == 6 * llm and dpo["vision"] == 3 * vision, "two LLM sequences on one vision pass"
    live = throughput.step_flops(model.config, shape, "dpo", "live")
    assert live["reference"] == vision + projector + 2 * llm
    assert live["total"] == dpo["total"] + live["reference"]


def _pair_batch(model, tokenizer, batch_size: int = 2) -> dict:
    spec = throughput.RunSpec(TINY_LLM, TINY_VISION, "dpo", batch_size=batch_size, **SHAPE)
    items = throughput.synthetic_items(spec, model.config, len(tokenizer), batch_size)
    return DataCollator(tokenizer.pad_token_id)(items)


def test_counter_matches_torch_flop_counter_forward_and_backward(tiny_model):
    model, tokenizer = tiny_model
    batch = _pair_batch(model, tokenizer)
    batch.pop("sample_ids")
    shape = throughput.SampleShape(int(model.config.image_seq_length), **SHAPE)
    per_sample = throughput.step_flops(model.config, shape, "dpo", "precomputed")
    forward = 2 * per_sample["total"] // 3  # 2 samples; a training step counts forward + 2 × forward
    model.zero_grad()
    with FlopCounterMode(display=False) as counter:
        chosen, rejected, _, _ = pair_logps(model, batch, share_image_encoding=True)
    assert counter.get_total_flops() == forward
    with FlopCounterMode(display=False) as counter:
        (chosen - rejected).sum().backward()
    # Backward = 2 × forward, less the patch embedding's input gradient (pixels need none).
    patch_embed = 2 * (2 * 16 * 192 * 32)
    assert counter.get_total_flops() == 2 * forward - patch_embed


def test_benchmark_step_runs_and_reports_consistent_numbers(tiny_model):
    # One short run of the real measure(): the numbers must be internally consistent.
    spec = throughput.RunSpec(TINY_LLM, TINY_VISION, "dpo", batch_size=2, warmup=1, steps=2, **SHAPE)
    result = throughput.measure(spec)
    assert len(result["step_s"]) == 2 and result["mfu"] is None  # CPU: MFU n/a
    assert result["samples_per_s"] == pytest.approx(2 / ((result["step_s"][0] + result["step_s"][1]) / 2))
    assert result["tokens_per_s"] == pytest.approx(result["samples_per_s"] * 2 * result["seq_len"])
    assert result["achieved_tflops"] * 1e12 == pytest.approx(
        result["flops_per_sample"]["total"] * result["samples_per_s"]
    )
    assert result["train_loss"] == pytest.approx(0.6931, abs=1e-3), "DPO loss at the reference is log 2"
    assert "error" not in result and "| dpo |" in throughput.summarise([result])


# ---- the paper's configs ---------------------------------------------------------------------------

# Qwen2.5 model cards: total parameters and parameters without embeddings, in billions, printed with
# 2 decimals (the cards round some and truncate others, e.g. 7.6156B is printed 7.61B).
PUBLISHED = {
    "qwen2.5-0.5b": (0.49, 0.36),
    "qwen2.5-1.5b": (1.54, 1.31),
    "qwen2.5-3b": (3.09, 2.77),
    "qwen2.5-7b": (7.61, 6.53),
}


@pytest.mark.parametrize("name", sorted(LLM_CONFIGS))
def test_llm_configs_match_the_published_parameter_counts(name: str):
    import transformers

    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(llm_config(name))
    total = sum(p.numel() for p in model.parameters())
    embeddings = model.get_input_embeddings().weight.numel()
    if not model.config.tie_word_embeddings:
        embeddings += model.get_output_embeddings().weight.numel()
    published_total, published_body = PUBLISHED[name]
    assert total / 1e9 == pytest.approx(published_total, abs=0.01)
    assert (total - embeddings) / 1e9 == pytest.approx(published_body, abs=0.01)


@pytest.mark.parametrize(("llm", "vision"), [("qwen2.5-7b", "siglip2-g16"), ("qwen2.5-0.5b", "siglip2-b16")])
def test_counter_matches_the_linear_layers_of_the_real_models(llm: str, vision: str):
    with torch.device("meta"):
        model, _, _ = build_model_from_configs(llm, vision, dtype="bfloat16")
    assert {p.device.type for p in model.parameters()} == {"meta"}, "the device context must reach every part"
    assert model.config.image_seq_length == IMAGE_TOKENS
    tower = model.model.vision_tower
    assert tower.config.num_hidden_layers == vision_config(vision).num_hidden_layers - 1  # select layer -2

    def linear_weights(module: torch.nn.Module) -> int:
        return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))

    d_v, n = tower.config.hidden_size, IMAGE_TOKENS
    vision_linear = linear_weights(tower.encoder)
    conv = tower.embeddings.patch_embedding.weight.numel()
    expected_vision = 2 * n * (vision_linear + conv) + tower.config.num_hidden_layers * 4 * n * n * d_v
    assert throughput.vision_forward_flops(tower.config) == expected_vision

    text = model.config.text_config
    s, k = 832, 192
    decoder_linear = linear_weights(model.model.language_model.layers)
    attention = (
        text.num_hidden_layers
        * 4
        * s
        * s
        * text.num_attention_heads
        * (text.hidden_size // text.num_attention_heads)
    )
    expected_llm = 2 * s * decoder_linear + attention + 2 * k * model.lm_head.weight.numel()
    assert throughput.llm_forward_flops(text, s, k) == expected_llm
    projector = linear_weights(model.model.multi_modal_projector)
    assert throughput.projector_forward_flops(n, d_v, text.hidden_size) == 2 * n * projector
    sizes = describe(model)
    assert sizes["projector_params"] == projector + 2 * text.hidden_size  # + the two bias vectors


@pytest.mark.parametrize("name", sorted(VISION_CONFIGS))
def test_siglip2_configs_give_576_tokens_of_a_consistent_width(name: str):
    config = vision_config(name)
    assert (config.image_size // config.patch_size) ** 2 == IMAGE_TOKENS
    assert config.hidden_size % config.num_attention_heads == 0
    assert config.model_type == "siglip_vision_model"


def test_peak_flops_by_device_name():
    assert throughput.peak_flops("NVIDIA H100 80GB HBM3", None) == 989e12
    assert throughput.peak_flops("NVIDIA H200", None) == 989e12
    assert throughput.peak_flops("NVIDIA H100 PCIe", None) == 756e12
    assert throughput.peak_flops("Some GPU", None) is None
    assert throughput.peak_flops("Some GPU", 100.0) == 100e12


def test_unknown_config_name_is_an_actionable_error():
    with pytest.raises(ValueError, match="qwen2.5-1.5b"):
        llm_config("qwen2.5-14b")


def test_benchmark_lora_rows_report_no_mfu(tiny_model):
    # LoRA rows (llava.train.lora): the FLOP count is full training's, so no TFLOP/s or MFU is claimed.
    spec = throughput.RunSpec(
        TINY_LLM, TINY_VISION, "dpo", batch_size=2, warmup=0, steps=1, lora=True, **SHAPE
    )
    result = throughput.measure(spec)
    assert result["achieved_tflops"] is None and result["mfu"] is None
    assert result["train_loss"] == pytest.approx(0.6931, abs=1e-3), "zero-initialised adapters: the base"
    assert "| dpo | LoRA r64 | 2 |" in throughput.summarise([result])
