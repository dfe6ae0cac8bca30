"""Encoder export (llava.export, llava.train.callbacks; docs/CONTRACTS.md §1).

The reference for every export is the MLLM itself: `model.model.get_image_features` (HF's own path:
tower → select layer/strategy → projector) on the MLLM's own image processor's pixels. Exports are read
back only the way the contract says (`AutoModel` + `hidden_states[feature_layer][:, num_prefix_tokens:]`
+ `linear_2(gelu(linear_1(x)))`, the exported image processor) and through `analysis.features`.
"""

from __future__ import annotations

import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from stage_fixtures import exported_tokens, mllm_tokens, train, write_world

from analysis.features import FeatureOptions, extract_features
from analysis.image_sources import array_source
from llava.export import apply_projector, export_checkpoint, export_model, fold_projector, main, read_export
from llava.model.builder import ModelConfig, build_model, load_model, save_model

CONTRACT_KEYS = {
    "format_version", "source_checkpoint", "global_step", "loss_type", "llm", "vision_tower", "encoder_family",
    "image_size", "patch_size", "grid", "tokens_per_image", "hidden_size", "feature_layer", "num_prefix_tokens",
    "mm_vision_select_layer", "visual_features",
}  # fmt: skip


@pytest.fixture(scope="module")
def mllms(tiny_dir):
    """family -> (model, tokenizer, image processor) of a tiny MLLM, built once per module."""
    cache = {}

    def get(family: str):
        if family not in cache:
            torch.manual_seed(0)
            model, tokenizer, processor = build_model(
                ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / family))
            )
            cache[family] = (model.eval(), tokenizer, processor)
        return cache[family]

    return get


@pytest.fixture(params=["siglip", "clip"])
def built(request, mllms):
    """A tiny MLLM (SigLIP: no prefix token; CLIP: a CLS token HF Llava drops) and its image processor."""
    return request.param, *mllms(request.param)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return write_world(tmp_path_factory.mktemp("export_world"))


def test_export_model_reproduces_mllm_visual_tokens(built, tmp_path):
    family, model, _, processor = built
    out = export_model(
        model, processor, tmp_path / "exp", source_checkpoint=tmp_path, global_step=7, loss_type="dpo"
    )
    meta = read_export(out)
    pixels = torch.randn(3, 3, 32, 32)
    assert torch.allclose(exported_tokens(out, pixels), mllm_tokens(model, pixels), atol=1e-6, rtol=0)
    assert set(meta) >= CONTRACT_KEYS
    assert meta["num_prefix_tokens"] == (1 if family == "clip" else 0)
    assert (meta["global_step"], meta["loss_type"], meta["feature_layer"]) == (7, "dpo", -1)
    assert meta["grid"] == [4, 4] and meta["tokens_per_image"] == 16 and meta["hidden_size"] == 32
    assert meta["mm_vision_select_layer"] == -2 and meta["requires_import"] is None
    projector = json.loads((out / "projector" / "config.json").read_text())
    assert projector == {
        "projector_type": "mlp2x_gelu", "in_features": 32, "hidden_features": 64, "out_features": 64,
        "act": "gelu", "bias": True,
    }  # fmt: skip
    # Already truncated: the exported tower has 2 of the tiny tower's 3 layers (select layer -2).
    assert transformers.AutoConfig.from_pretrained(out / "vision_encoder").num_hidden_layers == 2


# Every registry family (default feature point, plus pre-norm reads of post-norm families) and ensembles.
EVERY_TOWER = [
    *[(tower, None) for tower in ("siglip", "clip", "dinov2", "dinov2_reg", "mae", "vit", "convnext")],
    ("siglip+dinov2", None),
    ("dinov2+siglip", None),
    ("dinov2", -2),
    ("vit", -2),
]


@pytest.mark.parametrize(("tower", "select_layer"), EVERY_TOWER)
def test_every_family_export_reproduces_the_mllm_visual_tokens(tiny_dir, tmp_path, tower, select_layer):
    torch.manual_seed(0)
    model, tokenizer, processor = build_model(
        ModelConfig(
            llm=str(tiny_dir / "llm"),
            vision_tower="+".join(str(tiny_dir / part) for part in tower.split("+")),
            mm_vision_select_layer=select_layer,
        )
    )
    model.eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 70), (33, 32))]
    pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    expected = mllm_tokens(model, pixels)
    save_model(model, tokenizer, processor, tmp_path / "ckpt")
    live = export_model(model, processor, tmp_path / "live", source_checkpoint=tmp_path / "ckpt")
    disk = export_checkpoint(tmp_path / "ckpt", tmp_path / "disk")
    for out in (live, disk):
        exported = transformers.AutoImageProcessor.from_pretrained(out / "vision_encoder")
        exported_pixels = exported(images=[Image.fromarray(i) for i in images], return_tensors="pt")
        assert torch.equal(exported_pixels["pixel_values"], pixels)
        assert torch.allclose(exported_tokens(out, pixels), expected, atol=1e-6, rtol=0)
        assert read_export(out)["tokens_per_image"] == expected.shape[1]
    options = FeatureOptions(feature_points=("projector",), pooling=("tokens",), token_dtype="float32")
    extracted = extract_features(live, array_source(images), options, cache_dir=None, progress=False)
    np.testing.assert_allclose(extracted["projector.tokens"], expected.numpy(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("tower", ["dinov2", "dinov2_reg"])
def test_wrapped_tower_export_keeps_per_layer_features(tiny_dir, tmp_path, tower):
    """DINOv2 read after its final norm is exported as a one-member pivot_multi_tower whose hidden states
    keep the plain tower's layers (layer-wise probes and alignment read them)."""
    model, _, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / tower))
    )
    out = export_model(model.eval(), processor, tmp_path / "exp", source_checkpoint=tmp_path)
    images = [np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)]
    options = FeatureOptions(pooling=("mean",), layers=(1, 2))
    extracted = extract_features(out, array_source(images), options, cache_dir=None, progress=False)
    plain = transformers.AutoModel.from_pretrained(tiny_dir / tower).eval()
    pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        reference = plain(pixels, output_hidden_states=True)
    prefix = reference.last_hidden_state.shape[1] - 16
    for layer in (1, 2):
        expected = reference.hidden_states[layer][:, prefix:].mean(1).numpy()
        np.testing.assert_allclose(extracted[f"encoder.layer{layer}.mean"], expected, rtol=1e-4, atol=1e-5)
    expected = reference.last_hidden_state[:, prefix:].mean(1).numpy()  # the feature point: after the norm
    np.testing.assert_allclose(extracted["encoder.mean"], expected, rtol=1e-4, atol=1e-5)


def test_export_checkpoint_equals_in_memory_export(built, tmp_path):
    _, model, tokenizer, processor = built
    save_model(model, tokenizer, processor, tmp_path / "ckpt")
    live = export_model(model, processor, tmp_path / "live", source_checkpoint=tmp_path / "ckpt")
    disk = export_checkpoint(tmp_path / "ckpt", tmp_path / "disk")
    for part in ("vision_encoder", "projector"):
        a, b = load_file(live / part / "model.safetensors"), load_file(disk / part / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    live_meta, disk_meta = read_export(live), read_export(disk)
    assert {k: v for k, v in live_meta.items() if k != "global_step"} == {
        k: v for k, v in disk_meta.items() if k != "global_step"
    }
    assert disk_meta["global_step"] == -1  # a final directory without trainer_state.json


def test_export_loads_in_a_process_that_imports_only_transformers(mllms, tmp_path):
    model, _, processor = mllms("clip")  # CLS dropped, centre-cropping processor
    out = export_model(model, processor, tmp_path / "exp", source_checkpoint=tmp_path)
    image = tmp_path / "image.png"
    from PIL import Image

    Image.fromarray((torch.rand(40, 56, 3) * 255).to(torch.uint8).numpy()).save(image)
    script = r"""
import json, sys
import torch, transformers
from PIL import Image
from safetensors.torch import load_file
export, image, result = sys.argv[1:4]
meta = json.load(open(f"{export}/export.json"))
encoder = transformers.AutoModel.from_pretrained(f"{export}/vision_encoder")
processor = transformers.AutoImageProcessor.from_pretrained(f"{export}/vision_encoder")
pixels = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
w = load_file(f"{export}/projector/model.safetensors")
with torch.no_grad():
    feats = encoder(pixels, output_hidden_states=True).hidden_states[meta["feature_layer"]][:, meta["num_prefix_tokens"]:]
    hidden = torch.nn.functional.gelu(torch.nn.functional.linear(feats, w["linear_1.weight"], w["linear_1.bias"]))
    tokens = torch.nn.functional.linear(hidden, w["linear_2.weight"], w["linear_2.bias"])
leaked = sorted(m for m in sys.modules if m == "llava" or m.startswith("llava."))
assert not leaked, leaked
torch.save({"pixel_values": pixels, "tokens": tokens}, result)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    subprocess.run(
        [sys.executable, "-c", script, str(out), str(image), str(tmp_path / "result.pt")],
        check=True, cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    result = torch.load(tmp_path / "result.pt", weights_only=True)
    pixels = processor(images=Image.open(image).convert("RGB"), return_tensors="pt")["pixel_values"]
    assert torch.equal(result["pixel_values"], pixels)
    assert torch.allclose(result["tokens"], mllm_tokens(model, pixels), atol=1e-6, rtol=0)


def test_callback_exports_every_checkpoint_and_the_end(tiny_dir, world, tmp_path):
    out = tmp_path / "run"
    train([
        "--llm", str(tiny_dir / "llm"), "--vision_tower", str(tiny_dir / "siglip"),
        "--data_path", str(world / "llava" / "pretrain.json"), "--image_folder", str(world),
        "--conv_template", "plain", "--mm_tunable_parts", "mm_vision_tower,mm_mlp_adapter",
        "--learning_rate", "1e-2", "--mm_vision_tower_lr", "1e-2",
        "--output_dir", str(out), "--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1",
    ])  # fmt: skip
    pixels = torch.randn(2, 3, 32, 32)
    towers = []
    for checkpoint, step in ((out / "checkpoint-1", 1), (out / "checkpoint-2", 2), (out, 2)):
        meta = read_export(checkpoint)
        assert (meta["global_step"], meta["loss_type"]) == (step, "sft")
        assert meta["source_checkpoint"] == str(checkpoint.resolve())
        model, _, _ = load_model(checkpoint)
        assert torch.allclose(
            exported_tokens(checkpoint, pixels), mllm_tokens(model.eval(), pixels), atol=1e-6, rtol=0
        )
        towers.append(load_file(checkpoint / "vision_encoder" / "model.safetensors"))
    changed = [k for k in towers[0] if not torch.equal(towers[0][k], towers[1][k])]
    assert changed, "the tower trained between the checkpoints, so the two exports must differ"


def test_fold_projector_matches_sequential_layers():
    torch.manual_seed(0)
    state = {
        "linear_1.weight": torch.randn(6, 4), "linear_1.bias": torch.randn(6),
        "linear_2.weight": torch.randn(6, 6), "linear_2.bias": torch.randn(6),
        "linear_3.weight": torch.randn(5, 6), "linear_3.bias": torch.randn(5),
    }  # fmt: skip
    x = torch.randn(3, 4)
    hidden = torch.nn.functional.gelu(x @ state["linear_1.weight"].T + state["linear_1.bias"])
    expected = (hidden @ state["linear_2.weight"].T + state["linear_2.bias"]) @ state["linear_3.weight"].T
    expected = expected + state["linear_3.bias"]
    folded = fold_projector(state)
    assert set(folded) == {"linear_1.weight", "linear_1.bias", "linear_2.weight", "linear_2.bias"}
    assert torch.allclose(apply_projector(folded, x), expected, atol=1e-5)


class _FakeGather:
    """Stands in for deepspeed.zero.GatheredParameters: records which parameters were gathered."""

    calls: list[tuple[int, object]] = []

    def __init__(self, params, modifier_rank=None):
        self.calls.append((len(params), modifier_rank))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_zero3_gathers_on_every_process_and_only_the_main_one_writes(built, tmp_path, monkeypatch):
    _, model, _, processor = built
    fake = types.ModuleType("deepspeed")
    fake.__spec__ = importlib.machinery.ModuleSpec("deepspeed", None)
    fake.zero = types.SimpleNamespace(GatheredParameters=_FakeGather)
    fake.DeepSpeedEngine = type("DeepSpeedEngine", (), {})  # what accelerate's unwrap_model checks against
    monkeypatch.setitem(sys.modules, "deepspeed", fake)
    monkeypatch.setattr("llava.export.is_deepspeed_zero3_enabled", lambda: True)
    _FakeGather.calls = []
    export_model(model, processor, tmp_path / "rank1", source_checkpoint=tmp_path, is_main_process=False)
    tower, projector = model.model.vision_tower, model.model.multi_modal_projector
    expected = [(len(list(tower.parameters())), None), (len(list(projector.parameters())), None)]
    assert _FakeGather.calls == expected
    assert not (tmp_path / "rank1").exists()
    export_model(model, processor, tmp_path / "rank0", source_checkpoint=tmp_path, is_main_process=True)
    assert _FakeGather.calls == expected * 2
    assert (tmp_path / "rank0" / "export.json").exists()


def _llava_next_checkpoint(
    path: Path, tower_dir: Path, drop_last_layer: bool, tower_prefix: str = "vision_model."
) -> tuple[torch.nn.Module, dict]:
    """A checkpoint in the original LLaVA-NeXT/PIVOT layout around the tiny tower at `tower_dir`
    (`tower_prefix`: "vision_model." for CLIP/SigLIP towers, "" for PIVOT's DINOv2 `Dinov2Model`)."""
    full = transformers.AutoModel.from_pretrained(tower_dir)
    depth = full.config.num_hidden_layers
    tensors = {}
    for key, value in full.state_dict().items():
        if key.startswith("head.") or (drop_last_layer and f"encoder.layers.{depth - 1}." in key):
            continue  # LLaVA-NeXT's SigLIP tower replaces the head and deletes its last layer
        tensors[f"model.vision_tower.vision_tower.{tower_prefix}{key}"] = value.clone()
    torch.manual_seed(3)
    projector = {
        "linear_1.weight": torch.randn(64, 32) * 0.1, "linear_1.bias": torch.randn(64) * 0.1,
        "linear_2.weight": torch.randn(64, 64) * 0.1, "linear_2.bias": torch.randn(64) * 0.1,
    }  # fmt: skip
    for index, name in (("0", "linear_1"), ("2", "linear_2")):
        for kind in ("weight", "bias"):
            tensors[f"model.mm_projector.{index}.{kind}"] = projector[f"{name}.{kind}"]
    tensors["model.embed_tokens.weight"] = torch.randn(10, 64)
    tensors["model.layers.0.self_attn.q_proj.weight"] = torch.randn(64, 64)
    tensors["model.image_newline"] = torch.randn(64)
    tensors["lm_head.weight"] = torch.randn(10, 64)
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"], "_name_or_path": "Qwen/Qwen2.5-0.5B",
        "mm_vision_tower": str(tower_dir), "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_projector_type": "mlp2x_gelu", "mm_hidden_size": 32, "hidden_size": 64,
        "image_aspect_ratio": "anyres_max_9",
    }  # fmt: skip
    (path / "config.json").write_text(json.dumps(config))
    return full.eval(), projector


@pytest.mark.parametrize("family,drop_last_layer,prefix", [("siglip", True, 0), ("clip", False, 1)])
def test_llava_next_layout_export(tiny_dir, tmp_path, capsys, family, drop_last_layer, prefix):
    full, projector = _llava_next_checkpoint(tmp_path / "next", tiny_dir / family, drop_last_layer)
    main([str(tmp_path / "next"), str(tmp_path / "out"), "--loss_type", "dpo"])
    assert capsys.readouterr().out.strip() == str(tmp_path / "out")
    meta = read_export(tmp_path / "out")
    assert meta["num_prefix_tokens"] == prefix and meta["mm_vision_select_layer"] == -2
    assert (meta["encoder_family"], meta["loss_type"], meta["llm"]) == (family, "dpo", "Qwen/Qwen2.5-0.5B")
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():  # independent reference: the full tower's penultimate hidden state
        features = full(pixels, output_hidden_states=True).hidden_states[-2][:, prefix:]
    expected = apply_projector(projector, features)
    assert torch.allclose(exported_tokens(tmp_path / "out", pixels), expected, atol=1e-6, rtol=0)


def test_pivot_layout_dinov2_is_read_after_its_final_norm(tiny_dir, tmp_path):
    """PIVOT's DinoVisionTower feeds `last_hidden_state` (after the final LayerNorm), whatever
    mm_vision_select_layer (-2 here) says; the export is the wrapper the MLLM would run."""
    full, projector = _llava_next_checkpoint(tmp_path / "next", tiny_dir / "dinov2", False, tower_prefix="")
    export_checkpoint(tmp_path / "next", tmp_path / "out")
    meta = read_export(tmp_path / "out")
    assert (meta["requires_import"], meta["num_prefix_tokens"], meta["tokens_per_image"]) == (
        "llava.model",
        0,
        16,
    )
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = apply_projector(projector, full(pixels).last_hidden_state[:, 1:])
    assert torch.allclose(exported_tokens(tmp_path / "out", pixels), expected, atol=1e-6, rtol=0)


def test_llava_next_layout_without_a_readable_tower_config_is_an_error(tiny_dir, tmp_path):
    _llava_next_checkpoint(tmp_path / "next", tiny_dir / "siglip", True)
    config = json.loads((tmp_path / "next" / "config.json").read_text())
    config["mm_vision_tower"] = str(tmp_path / "missing-tower")
    (tmp_path / "next" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="--vision_config"):
        export_checkpoint(tmp_path / "next", tmp_path / "out")
    export_checkpoint(tmp_path / "next", tmp_path / "out", vision_config=str(tiny_dir / "siglip"))
    assert read_export(tmp_path / "out")["vision_tower"] == str(tmp_path / "missing-tower")


def test_not_a_checkpoint_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        export_checkpoint(tmp_path, tmp_path / "out")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="neither an HF Llava"):
        export_checkpoint(tmp_path, tmp_path / "out")


def test_multi_tower_export_says_it_needs_llava(tiny_dir, tmp_path):
    model, _, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "dinov2_reg"))
    )
    out = export_model(model.eval(), processor, tmp_path / "exp", source_checkpoint=tmp_path)
    meta = read_export(out)
    assert meta["requires_import"] == "llava.model" and meta["encoder_family"] == "multi_tower"
    assert (
        json.loads((out / "vision_encoder" / "config.json").read_text())["model_type"] == "pivot_multi_tower"
    )
    pixels = torch.randn(2, 3, 32, 32)
    assert torch.allclose(exported_tokens(out, pixels), mllm_tokens(model, pixels), atol=1e-6, rtol=0)
