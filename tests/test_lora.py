"""LoRA / QLoRA through peft (llava.train.lora, llava.model.adapters; issue 18).

Pinned here: the trainable set is exactly what the flags ask for, per --mm_tunable_parts setting, and
everything else stays bit-identical through training; the live DPO reference is the adapter-disabled
base (log 2 at step 0, equal to a deep-copied base model also after the policy moved, requires_grad flags
kept); exports and merged checkpoints are plain models equal to the adapted one; resume equals an
uninterrupted run; bad flag combinations are refused.
"""

from __future__ import annotations

import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers
from stage_fixtures import exported_tokens, mllm_tokens
from train_fixtures import build_components, max_abs_diff, run_main, train_argv, train_data  # noqa: F401

from llava.export import export_checkpoint, read_export
from llava.model.adapters import base_llava
from llava.model.builder import load_model
from llava.train.args import PivotTrainingArguments
from llava.train.logps import pair_logps
from llava.train.lora import LLM_TARGETS, LoraArguments, adapters_disabled, apply_lora
from llava.train.trainer import PivotTrainer

ROOT = Path(__file__).resolve().parents[1]
FAST = {"export_encoder": False, "lora_r": 4, "lora_alpha": 8, "lora_dropout": 0.0}
TOWER_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def lora_names(prefix: str, layers: int, modules: tuple[str, ...]) -> set[str]:
    return {
        f"base_model.model.{prefix}.layers.{i}.{m}.lora_{ab}.default.weight"
        for i in range(layers)
        for m in modules
        for ab in "AB"
    }


def expected_trainable(plain: dict[str, torch.Tensor], parts: str, lora_vision: bool) -> set[str]:
    """The trainable names a LoRA run must have, spelled out from the plain model's parameter names."""
    llm_modules = tuple(
        f"{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}" for m in LLM_TARGETS
    )  # q,k,v,o under self_attn; gate,up,down under mlp
    names: set[str] = set()
    if "mm_language_model" in parts:
        names |= lora_names("model.language_model", 2, llm_modules)
    if "mm_mlp_adapter" in parts:
        names |= {
            n.replace(
                "model.multi_modal_projector.",
                "base_model.model.model.multi_modal_projector.modules_to_save.default.",
            )
            for n in plain
            if n.startswith("model.multi_modal_projector.")
        }
    if "mm_vision_tower" in parts and lora_vision:
        names |= lora_names("model.vision_tower.encoder", 2, TOWER_LINEARS)
    elif "mm_vision_tower" in parts:  # trained fully, except the final norm the pre-norm reading never uses
        names |= {
            n.replace("model.vision_tower.", "base_model.model.model.vision_tower.modules_to_save.default.")
            for n in plain
            if n.startswith("model.vision_tower.") and ".post_layernorm." not in n
        }
    return names


def plain_of(name: str) -> str:
    name = name.removeprefix("base_model.model.")
    for level in (".modules_to_save.default.", ".original_module.", ".base_layer."):
        name = name.replace(level, ".")
    return name


SETTINGS = [
    ("mm_language_model", False),
    ("mm_mlp_adapter,mm_language_model", False),
    ("mm_vision_tower,mm_mlp_adapter,mm_language_model", False),
    ("mm_vision_tower,mm_mlp_adapter,mm_language_model", True),
    ("mm_vision_tower", True),
]


@pytest.mark.parametrize(("parts", "lora_vision"), SETTINGS)
def test_trainable_set_is_what_the_flags_ask_and_the_rest_stays_bit_identical(
    train_data,  # noqa: F811
    tmp_path,
    parts,
    lora_vision,
):
    out = tmp_path / "out"
    trainer = run_main(
        train_argv(
            train_data,
            out,
            "sft",
            lora_enable=True,
            mm_tunable_parts=parts,
            lora_vision=lora_vision,
            mm_vision_tower_lr=5e-4,
            **FAST,
        )
    )
    base, _, _ = load_model(out / "lora_base")  # written before training: the initial model
    initial = {n: p.detach() for n, p in base.named_parameters(remove_duplicate=False)}
    trained = dict(trainer.model.named_parameters())
    trainable = {n for n, p in trained.items() if p.requires_grad}
    assert trainable == expected_trainable(initial, parts, lora_vision)
    for name, param in trained.items():
        if name in trainable:
            start = torch.zeros_like(param) if ".lora_B." in name else initial.get(plain_of(name))
            if start is not None:  # lora_A starts random: it moved if lora_B got a gradient
                assert not torch.equal(param.detach(), start), f"{name} never trained"
        else:
            assert torch.equal(param.detach(), initial[plain_of(name)]), f"frozen {name} changed"
    specs = trainer.param_group_specs
    assert {spec.part for spec in specs} == set(parts.split(","))
    if "mm_vision_tower" in parts:  # the tower's own LR, for its adapters too
        assert {spec.lr for spec in specs if spec.part == "mm_vision_tower"} == {5e-4}


def _lora_dpo_trainer(data, output_dir, parts: str, steps: int = 2):
    model, tokenizer, dataset, collator = build_components(data, "dpo", parts)
    initial = copy.deepcopy(model).eval()
    lora = LoraArguments(lora_enable=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    peft_model = apply_lora(model, tuple(parts.split(",")), lora)
    args = PivotTrainingArguments(
        output_dir=str(output_dir),
        loss_type="dpo",
        reference="live",
        mm_tunable_parts=parts,
        per_device_train_batch_size=2,
        max_steps=steps,
        learning_rate=1e-2,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    trainer = PivotTrainer(
        model=peft_model, args=args, train_dataset=dataset, data_collator=collator, processing_class=tokenizer
    )
    return trainer, initial, collator([dataset[i] for i in range(2)])


def test_dpo_reference_is_the_adapter_disabled_base_model(train_data, tmp_path):  # noqa: F811
    parts = "mm_vision_tower,mm_mlp_adapter,mm_language_model"  # tower and projector fully trained copies
    trainer, initial, batch = _lora_dpo_trainer(train_data, tmp_path / "out", parts)
    assert trainer.ref_model is None and trainer.reference_is_base
    ids = batch.pop("sample_ids")
    model = trainer.model
    loss = trainer.compute_loss(model, {**batch, "sample_ids": ids})
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    mode = model.training
    with torch.no_grad():
        copied = pair_logps(initial, batch)[:2]
    with adapters_disabled(model) as base:
        disabled = pair_logps(base, batch)[:2]
    torch.testing.assert_close(disabled, copied, rtol=0, atol=1e-5)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert model.training == mode

    trainer.train()
    with torch.no_grad():
        moved = pair_logps(model.eval(), batch)[:2]
    with adapters_disabled(model) as base:
        disabled = pair_logps(base, batch)[:2]
    torch.testing.assert_close(disabled, copied, rtol=0, atol=1e-5)  # still the untouched base
    assert max(float((m - c).abs().max()) for m, c in zip(moved, copied)) > 1e-3, "the policy never moved"
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


def test_precomputed_reference_with_lora_starts_at_log_2(train_data, tmp_path):  # noqa: F811
    trainer = run_main(
        train_argv(train_data, tmp_path / "out", "dpo", lora_enable=True, reference="precomputed", **FAST)
    )
    first = next(row for row in trainer.state.log_history if "loss/dpo" in row)
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-4)


ONLY_TRANSFORMERS = r"""
import json, sys
import torch, transformers
from safetensors.torch import load_file
export, result = sys.argv[1], sys.argv[2]
meta = json.load(open(f"{export}/export.json"))
encoder = transformers.AutoModel.from_pretrained(f"{export}/vision_encoder")
w = load_file(f"{export}/projector/model.safetensors")
torch.manual_seed(0)
pixels = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    feats = encoder(pixels, output_hidden_states=True).hidden_states[meta["feature_layer"]][:, meta["num_prefix_tokens"]:]
    hidden = torch.nn.functional.gelu(torch.nn.functional.linear(feats, w["linear_1.weight"], w["linear_1.bias"]))
    tokens = torch.nn.functional.linear(hidden, w["linear_2.weight"], w["linear_2.bias"])
leaked = sorted(m for m in sys.modules if m.split(".")[0] in ("llava", "peft"))
assert not leaked, leaked
torch.save({"pixel_values": pixels, "tokens": tokens}, result)
"""


def test_merged_exports_and_checkpoint_equal_the_adapted_model(train_data, tmp_path):  # noqa: F811
    out, merged = tmp_path / "out", tmp_path / "merged"
    parts = "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    flags = {**FAST, "export_encoder": True, "learning_rate": 1e-2, "mm_vision_tower_lr": 1e-2}
    trainer = run_main(
        train_argv(
            train_data,
            out,
            "dpo",
            reference="live",
            lora_enable=True,
            lora_vision=True,
            mm_tunable_parts=parts,
            save_strategy="steps",
            save_steps=2,
            merge_lora_into=merged,
            **flags,
        )
    )
    model = trainer.model.eval()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", ONLY_TRANSFORMERS, str(out), str(tmp_path / "result.pt")],
        check=True,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    adapted = mllm_tokens(base_llava(model), result["pixel_values"])
    assert not torch.allclose(
        adapted, mllm_tokens(load_model(out / "lora_base")[0].eval(), result["pixel_values"]), atol=1e-4
    ), "training must have moved the visual tokens"
    assert torch.allclose(result["tokens"], adapted, atol=1e-6, rtol=0)

    cli = export_checkpoint(out / "checkpoint-2", tmp_path / "cli")  # python -m llava.export's path
    assert read_export(cli)["global_step"] == 2
    assert torch.allclose(exported_tokens(cli, result["pixel_values"]), adapted, atol=1e-6, rtol=0)

    plain = transformers.LlavaForConditionalGeneration.from_pretrained(str(merged)).eval()
    batch = {k: v for k, v in trainer.data_collator([trainer.train_dataset[0]]).items() if torch.is_tensor(v)}
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "pixel_values")}
    with torch.no_grad():
        expected = model(**inputs).logits
        torch.testing.assert_close(plain(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


RESUME = {
    **FAST,
    "save_strategy": "steps",
    "save_steps": 2,
    "reference": "live",
    "lora_vision": True,
    "lr_scheduler_type": "constant",
}


def test_resume_with_lora_equals_an_uninterrupted_run(train_data, tmp_path):  # noqa: F811
    full = run_main(train_argv(train_data, tmp_path / "full", "dpo", lora_enable=True, max_steps=4, **RESUME))
    out = tmp_path / "resumed"
    first = run_main(train_argv(train_data, out, "dpo", lora_enable=True, max_steps=2, **RESUME))
    assert (out / "checkpoint-2" / "adapter_model.safetensors").is_file()
    halfway = {n: p.detach().clone() for n, p in first.model.named_parameters() if p.requires_grad}
    resumed = run_main(train_argv(train_data, out, "dpo", lora_enable=True, max_steps=4, **RESUME))
    assert resumed.state.global_step == 4
    final = {n: p.detach() for n, p in resumed.model.named_parameters() if p.requires_grad}
    reference = {n: p.detach() for n, p in full.model.named_parameters() if p.requires_grad}
    assert max_abs_diff(final, halfway) > 1e-4, "steps 3-4 must change the adapters"
    torch.testing.assert_close(final, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("flags", "parts", "message"),
    [
        ({"lora_vision": True}, None, "need --lora_enable"),
        ({"lora_enable": True, "lora_vision": True}, "mm_mlp_adapter,mm_language_model", "freezes it"),
        ({"lora_enable": True}, "mm_mlp_adapter", "adapts nothing"),
        ({"lora_enable": True, "lora_r": 0}, None, "r >= 1"),
        ({"lora_enable": True, "lora_target_modules": "query"}, "mm_language_model", "names no linear layer"),
    ],
)
def test_bad_lora_flags_are_refused(train_data, flags, parts, message):  # noqa: F811
    with pytest.raises(ValueError, match=message):
        lora = LoraArguments(**flags)
        model, _, _, _ = build_components(train_data, "sft", parts)
        apply_lora(model, tuple(parts.split(",")), lora)


LORA_VARIABLES = ("LORA", "LORA_R", "LORA_ALPHA", "LORA_DROPOUT", "LORA_VISION")
SHOW_FLAGS = 'source scripts/train/common.sh && pivot_lora_flags && printf "%s\\n" "${LORA_FLAGS[@]}"'


def lora_flags(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("LORA")}
    return subprocess.run(
        ["bash", "-c", SHOW_FLAGS],
        cwd=ROOT,
        env={**clean, "PYTHON": sys.executable, **env},
        capture_output=True,
        text=True,
    )


def test_every_training_script_passes_its_lora_variables():
    for script in sorted((ROOT / "scripts" / "train").glob("*.sh")):
        text = script.read_text()
        if (
            "source scripts/train/common.sh" in text
        ):  # the MLLM training scripts (not stage0.sh, the libraries)
            assert all(f"{v}=${{{v}:-" in text for v in LORA_VARIABLES), f"{script.name} lacks the LoRA block"
    assert lora_flags(LORA="0").stdout.strip() == ""
    done = lora_flags(LORA="1", LORA_R="8", LORA_ALPHA="32", LORA_DROPOUT="0.1", LORA_VISION="1")
    assert done.returncode == 0, done.stderr
    (parsed,) = transformers.HfArgumentParser(LoraArguments).parse_args_into_dataclasses(done.stdout.split())
    assert (parsed.lora_enable, parsed.lora_r, parsed.lora_alpha, parsed.lora_vision) == (True, 8, 32, True)
    assert parsed.lora_dropout == pytest.approx(0.1)
    refused = lora_flags(LORA="yes")
    assert refused.returncode != 0 and "LORA=yes" in refused.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal; CUDA machines run QLoRA below")
def test_bits_are_refused_without_cuda():
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        LoraArguments(lora_enable=True, bits=4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="QLoRA needs CUDA")
@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_trains_adapters_on_a_quantized_llm(train_data, tmp_path, bits):  # noqa: F811
    pytest.importorskip("bitsandbytes")
    argv = [
        a
        for a in train_argv(train_data, tmp_path / "out", "dpo", lora_enable=True, bits=bits, **FAST)
        if a != "--use_cpu"
    ]
    trainer = run_main(argv + ["--bf16"])
    llm = base_llava(trainer.model).model.language_model
    assert any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in llm.modules())
    first = next(row for row in trainer.state.log_history if "loss/dpo" in row)
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-3)
    merged, _, _ = load_model(tmp_path / "out")  # merged into the full-precision base
    assert not any(type(m).__name__ in ("Linear4bit", "Linear8bitLt") for m in merged.modules())


def test_stage3_with_lora_keeps_the_encoder_and_reused_layers_frozen(train_data, tmp_path):  # noqa: F811
    from llava.model.builder import ModelConfig, build_model, save_model
    from llava.tiny import write_llm

    transformers.set_seed(0)
    stage2 = build_model(ModelConfig(llm=str(train_data.llm), vision_tower=str(train_data.vision_tower)))
    save_model(*stage2, tmp_path / "stage2")
    llm48 = write_llm(tmp_path / "llm48", seed=1, hidden=48)
    argv = train_argv(
        train_data,
        tmp_path / "out",
        "sft",
        llm=llm48,
        stage3_source=tmp_path / "stage2",
        lora_enable=True,
        mm_tunable_parts="mm_mlp_adapter,mm_language_model",
        **{**FAST, "export_encoder": True},
    )
    trainer = run_main([a for a in argv if not a.startswith("--vision_tower=")])
    trainable = {n for n, p in trainer.model.named_parameters() if p.requires_grad}
    copy_prefix = "base_model.model.model.multi_modal_projector.modules_to_save.default."
    llm_modules = tuple(f"{'self_attn' if m[0] in 'qkvo' else 'mlp'}.{m}" for m in LLM_TARGETS)
    assert trainable == lora_names("model.language_model", 2, llm_modules) | {
        f"{copy_prefix}linear_2.weight",
        f"{copy_prefix}linear_2.bias",
    }  # reuse 1 + 1: the Stage-2 linear_1 stays frozen, the encoder too
    stage2_projector = stage2[0].model.multi_modal_projector.state_dict()
    merged, _, _ = load_model(tmp_path / "out")
    assert torch.equal(
        merged.model.multi_modal_projector.linear_1.weight, stage2_projector["linear_1.weight"]
    )
    for name, value in stage2[0].model.vision_tower.state_dict().items():
        assert torch.equal(merged.model.vision_tower.state_dict()[name], value), name
    pixels = torch.randn(2, 3, 32, 32)
    adapted = mllm_tokens(base_llava(trainer.model.eval()), pixels)
    assert torch.allclose(exported_tokens(tmp_path / "out", pixels), adapted, atol=1e-6, rtol=0)
    assert torch.allclose(mllm_tokens(merged.eval(), pixels), adapted, atol=1e-6, rtol=0)
