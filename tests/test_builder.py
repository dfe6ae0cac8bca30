"""The MLLM builder (llava.model.builder), image-token counting and presets.

Every tower of the registry (plus a SigLIP+DINOv2 ensemble) × {square, anyres_max_9}: forward and
backward with labels, a gradient for every trainable parameter, and as many `<image>` tokens as the
model scatters features. The visual tokens are checked against the FULL tower run with plain
transformers (PIVOT's feature point: after the final norm for DINOv2/MAE/ViT at the last layer, LLaVA's
pre-norm hidden state otherwise); anyres counts against values derived by hand from LLaVA-OneVision's rules. Checkpoints
round-trip through `load_model` and through a fresh interpreter that imports transformers only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers

from llava.model.builder import ModelConfig, build_model, ensure_image_token, load_model, save_model
from llava.model.image_tokens import image_token_counter
from llava.model.presets import resolve_llm, resolve_vision_tower, split_ensemble

TOWERS = ["siglip", "clip", "dinov2", "dinov2_reg", "mae", "vit", "convnext", "siglip+dinov2"]
SQUARE_SIZES = [(32, 32), (20, 70)]
# Anyres on the tiny 32 px / patch-8 towers (tile 32, 4x4 grid, pinpoints 32..192 px), derived by hand:
#   wide 30x90  → best fit 32x96 → 4x12 grid, no unpad → 16 + 4*(12+1) = 68
#   tall 90x30  → best fit 96x32 → 12x4 grid           → 16 + 12*(4+1) = 76
#   tiny 5x7    → best fit 32x32 → 4x4; rows: int(5*4/7) = 2, pad 1 each side → 16 + 2*(4+1) = 26
#   large 384x288 → best fit 192x160 → 24x20; cols int(288*24/384) = 18 → 24x18 = 432 > 1.1² * 9*16,
#                 ratio √3 → int(24/√3) x int(18/√3) = 13x10 → 16 + 13*(10+1) = 159
ANYRES_SIZES = {(30, 90): 68, (90, 30): 76, (5, 7): 26, (384, 288): 159}
PROMPT = "what is this?"
ANSWER = "a red circle"


def _tower_arg(tiny_dir, tower: str) -> str:
    return "+".join(str(tiny_dir / part) for part in tower.split("+"))


def _images(sizes) -> list[Image.Image]:
    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _sizes(aspect: str) -> list[tuple[int, int]]:
    return SQUARE_SIZES if aspect == "square" else list(ANYRES_SIZES)


def _batch(model, tokenizer, processor, sizes, drop_one_image_token: bool = False) -> dict:
    """One `<image>` prompt per image, expanded to `image_token_counter(config)(h, w)` tokens."""
    count = image_token_counter(model.config)
    image_id = model.config.image_token_id
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    rows, labels = [], []
    for h, w in sizes:
        n_image = count(h, w) - (1 if drop_one_image_token else 0)
        rows.append([image_id] * n_image + prompt + answer)
        labels.append([-100] * (n_image + len(prompt)) + answer)
    length = max(map(len, rows))
    pad = tokenizer.pad_token_id
    batch = {
        "input_ids": torch.tensor([r + [pad] * (length - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (length - len(r)) for r in rows]),
        "labels": torch.tensor([r + [-100] * (length - len(r)) for r in labels]),
    }
    batch.update(processor(_images(sizes), return_tensors="pt"))
    return batch


@pytest.fixture(scope="module")
def built(tiny_dir):
    """(tower, aspect ratio) → (model, tokenizer, image_processor), built once per module."""
    cache: dict[tuple[str, str], tuple] = {}

    def get(tower: str, aspect: str = "square"):
        if (tower, aspect) not in cache:
            cfg = ModelConfig(
                llm=str(tiny_dir / "llm"), vision_tower=_tower_arg(tiny_dir, tower), image_aspect_ratio=aspect
            )
            cache[tower, aspect] = build_model(cfg)
        return cache[tower, aspect]

    return get


def _image_features(model, batch) -> list[torch.Tensor]:
    extra = {"image_sizes": batch["image_sizes"]} if "image_sizes" in batch else {}
    with torch.no_grad():
        return list(model.model.get_image_features(pixel_values=batch["pixel_values"], **extra).pooler_output)


def _logits(model, batch) -> torch.Tensor:
    model.eval()
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


# ---------------------------------------------------------------- forward, backward, token counts


# Anyres for every tower but SigLIP is marked slow (the whole file exceeds 60 s on a busy 2-core box).
TOWER_ASPECTS = [
    pytest.param(tower, aspect, marks=[pytest.mark.slow] if aspect != "square" and tower != "siglip" else [])
    for tower in TOWERS
    for aspect in ("square", "anyres_max_9")
]


@pytest.mark.parametrize(("tower", "aspect"), TOWER_ASPECTS)
def test_forward_backward_reaches_every_trainable_parameter(built, tower, aspect):
    model, tokenizer, processor = built(tower, aspect)
    sizes = _sizes(aspect)
    batch = _batch(model, tokenizer, processor, sizes)

    counts = [image_token_counter(model.config)(h, w) for h, w in sizes]
    assert (batch["input_ids"] == model.config.image_token_id).sum(dim=1).tolist() == counts
    assert [len(f) for f in _image_features(model, batch)] == counts  # what the model scatters
    vision = model.config.vision_config
    grid = vision.image_size // vision.patch_size
    if aspect == "square":
        assert counts == [grid**2] * len(sizes)
    elif grid == 4:
        assert counts == list(ANYRES_SIZES.values())

    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(n for n, p in trainable.items() if p.grad is None)
    assert not missing, f"{tower}/{aspect}: no gradient for {missing}"
    assert any(n.startswith("model.vision_tower.") for n in trainable)
    if aspect != "square":
        assert trainable["model.image_newline"].grad.abs().sum() > 0


@pytest.mark.parametrize("aspect", ["square", "anyres_max_9"])
def test_image_token_mismatch_raises(built, aspect):
    model, tokenizer, processor = built("siglip", aspect)
    sizes = _sizes(aspect)[:2]
    batch = _batch(model, tokenizer, processor, sizes, drop_one_image_token=True)
    with pytest.raises(ValueError, match="Image features and image tokens do not match"):
        model(**batch)


POST_NORM_AT_LAST_LAYER = {"dinov2", "dinov2_reg", "mae", "vit"}


def _reference_features(tiny_dir, family_dir: str, select_layer: int, pixels: torch.Tensor) -> torch.Tensor:
    """Visual tokens from the FULL tower (plain transformers), prefix dropped: `last_hidden_state` (after the
    final norm) for POST_NORM_AT_LAST_LAYER families read at the last layer, else hidden_states[select_layer]."""
    path = tiny_dir / family_dir
    config = transformers.AutoConfig.from_pretrained(path)
    if config.model_type == "vit_mae":
        full = transformers.ViTMAEModel.from_pretrained(path, mask_ratio=0.0).eval()
        patches = (config.image_size // config.patch_size) ** 2
        extra = {"noise": torch.arange(patches, dtype=torch.float32).repeat(len(pixels), 1)}  # keeps order
    else:
        full, extra = transformers.AutoModel.from_pretrained(path).eval(), {}
    with torch.no_grad():
        out = full(pixels, output_hidden_states=True, **extra)
    last = select_layer in (-1, len(out.hidden_states) - 1)
    post_norm = family_dir in POST_NORM_AT_LAST_LAYER and last
    hidden = out.last_hidden_state if post_norm else out.hidden_states[select_layer]
    if hidden.dim() == 4:  # ConvNeXt map [B, C, h, w] → row-major tokens
        return hidden.permute(0, 2, 3, 1).flatten(1, 2)
    prefix = hidden.shape[1] - (config.image_size // config.patch_size) ** 2
    return hidden[:, prefix:]


@pytest.mark.parametrize(
    ("tower", "select_layer", "expected_layer"),
    [
        ("siglip", None, -2),
        ("siglip", 1, 1),
        ("clip", None, -2),
        ("dinov2", None, -1),
        ("dinov2", -2, -2),
        ("dinov2_reg", None, -1),
        ("dinov2_reg", -2, -2),
        ("mae", None, -1),
        ("vit", None, -1),
        ("vit", -2, -2),
        ("vit", 3, 3),
        ("convnext", None, -1),
    ],
)
def test_projector_reads_selected_hidden_state_of_full_tower(tiny_dir, tower, select_layer, expected_layer):
    cfg = ModelConfig(
        llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / tower), mm_vision_select_layer=select_layer
    )
    model, _, processor = build_model(cfg)
    assert model.config.mm_vision_select_layer == expected_layer
    pixels = processor(_images(SQUARE_SIZES), return_tensors="pt")["pixel_values"]
    features = torch.stack(_image_features(model, {"pixel_values": pixels}))
    with torch.no_grad():
        expected = model.model.multi_modal_projector(
            _reference_features(tiny_dir, tower, expected_layer, pixels)
        )
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- save / load


# Multi-tower checkpoints (ensemble, DINOv2 registers, DINOv2 read after its final norm) load in-process
# after `import llava.model`; MAE/ViT read after their final norm stay plain HF (tie_last_hidden_states).
SAVED = [
    ("siglip", "square"),
    ("clip", "square"),
    ("siglip", "anyres_max_9"),
    ("siglip+dinov2", "square"),
    ("dinov2_reg", "square"),
    ("dinov2", "square"),
    ("mae", "square"),
]


@pytest.fixture(scope="module")
def saved(built, tmp_path_factory):
    """Saved checkpoints with the inputs (.npy) and in-process logits of the built model."""
    root = tmp_path_factory.mktemp("checkpoints")
    out = {}
    for tower, aspect in SAVED:
        model, tokenizer, processor = built(tower, aspect)
        batch = _batch(model, tokenizer, processor, _sizes(aspect))
        path = root / f"{tower.replace('+', '_')}-{aspect}"
        save_model(model, tokenizer, processor, path)
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        for key, value in inputs.items():
            np.save(path / f"input_{key}.npy", value.numpy())
        out[tower, aspect] = (path, batch, _logits(model, batch), model)
    return out


@pytest.mark.parametrize(("tower", "aspect"), SAVED)
def test_load_model_gives_identical_logits_and_freezing(saved, tower, aspect):
    path, batch, logits, built_model = saved[tower, aspect]
    model, tokenizer, processor = load_model(path)
    expected_class = (
        "LlavaForConditionalGeneration" if aspect == "square" else "LlavaOnevisionForConditionalGeneration"
    )
    assert type(model).__name__ == expected_class
    torch.testing.assert_close(_logits(model, batch), logits, rtol=0, atol=1e-6)
    reloaded = _batch(model, tokenizer, processor, _sizes(aspect))
    torch.testing.assert_close(reloaded["pixel_values"], batch["pixel_values"])
    assert reloaded["input_ids"].tolist() == batch["input_ids"].tolist()

    def frozen(m):
        return sorted(n for n, p in m.named_parameters() if not p.requires_grad)

    assert frozen(model) == frozen(built_model) != []
    model.train()
    model(**batch).loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


FRESH_LOADER = textwrap.dedent(
    """
    import sys
    from pathlib import Path

    import numpy as np
    import torch
    import transformers

    for path in map(Path, sys.argv[1:]):
        model = transformers.AutoModelForImageTextToText.from_pretrained(path).eval()
        inputs = {f.stem.removeprefix("input_"): torch.from_numpy(np.load(f)) for f in path.glob("input_*.npy")}
        with torch.no_grad():
            logits = model(**inputs).logits
        np.save(path / "fresh_logits.npy", logits.numpy())
        print(path.name, type(model).__name__)
    assert not any(name == "llava" or name.startswith("llava.") for name in sys.modules), "llava was imported"
    """
)


@pytest.mark.slow
def test_fresh_interpreter_with_transformers_only_gives_identical_logits(saved, tmp_path):
    keys = [("siglip", "square"), ("clip", "square"), ("siglip", "anyres_max_9"), ("mae", "square")]
    script = tmp_path / "load_with_transformers_only.py"
    script.write_text(FRESH_LOADER)
    paths = [saved[key][0] for key in keys]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, str(script), *map(str, paths)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LlavaForConditionalGeneration" in result.stdout
    assert "LlavaOnevisionForConditionalGeneration" in result.stdout
    for key, path in zip(keys, paths):
        fresh = np.load(path / "fresh_logits.npy")
        np.testing.assert_allclose(fresh, saved[key][2].numpy(), rtol=0, atol=1e-6, err_msg=str(key))


def test_saved_config_records_llava_next_knobs(saved, tiny_dir):
    square = json.loads((saved["siglip", "square"][0] / "config.json").read_text())
    assert square["mm_vision_tower"] == str(tiny_dir / "siglip")
    assert square["mm_vision_select_layer"] == -2
    assert square["mm_projector_type"] == "mlp2x_gelu"
    assert square["image_aspect_ratio"] == "square"
    assert square["vision_config"]["num_hidden_layers"] == 2  # 3-layer tower truncated at -2
    anyres = json.loads((saved["siglip", "anyres_max_9"][0] / "config.json").read_text())
    assert anyres["image_aspect_ratio"] == anyres["vision_aspect_ratio"] == "anyres_max_9"
    ensemble = json.loads((saved["siglip+dinov2", "square"][0] / "config.json").read_text())
    assert ensemble["mm_vision_tower"] == _tower_arg(tiny_dir, "siglip+dinov2")
    assert ensemble["vision_config"]["model_type"] == "pivot_multi_tower"
    assert ensemble["mm_vision_select_layer"] == -2  # the first member's (SigLIP) default


# ---------------------------------------------------------------- config validation, tokenizer


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("mm_projector_type", "linear", "mm_projector_type='linear'"),
        ("image_aspect_ratio", "pad", "image_aspect_ratio='pad'"),
        ("mm_vision_select_feature", "cls", "mm_vision_select_feature='cls'"),
        ("dtype", "float8", "dtype='float8'"),
        (
            {"mm_vision_select_feature": "cls_patch", "image_aspect_ratio": "anyres_max_9"},
            None,
            "'square' only",
        ),
    ],
)
def test_model_config_rejects_bad_values(field, value, message):
    settings = field if isinstance(field, dict) else {field: value}
    with pytest.raises(ValueError, match=message):
        ModelConfig(llm="llm", vision_tower="tower", **settings)


def _word_tokenizer() -> transformers.PreTrainedTokenizerFast:
    words = ["<pad>", "what", "is", "this", "?", "a", "red", "circle", "yes", "no"]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>")


def test_ensure_image_token_adds_it_once():
    tokenizer = _word_tokenizer()
    assert "<image>" not in tokenizer.get_vocab()
    image_id = ensure_image_token(tokenizer)
    assert image_id == 10 and len(tokenizer) == 11
    assert tokenizer("what <image> is", add_special_tokens=False)["input_ids"] == [1, 10, 2]
    assert ensure_image_token(tokenizer) == 10 and len(tokenizer) == 11


def test_build_resizes_embeddings_for_new_image_token(tiny_dir, tmp_path):
    tokenizer = _word_tokenizer()
    config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert "<image>" not in transformers.AutoTokenizer.from_pretrained(tmp_path).get_vocab()
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(tmp_path), vision_tower=str(tiny_dir / "siglip"))
    )
    image_id = model.config.image_token_id
    assert tokenizer.convert_ids_to_tokens(image_id) == "<image>"
    assert image_id >= config.vocab_size  # out of range of the saved embedding table
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == image_id + 1
    assert model.lm_head.weight is model.get_input_embeddings().weight
    logits = model(**_batch(model, tokenizer, processor, SQUARE_SIZES)).logits
    assert logits.shape[-1] == len(tokenizer)


# ---------------------------------------------------------------- presets


def test_resolve_llm_presets_and_pass_through():
    assert resolve_llm("qwen2.5-1.5b") == "Qwen/Qwen2.5-1.5B-Instruct"
    assert resolve_llm("Qwen2.5-7B") == "Qwen/Qwen2.5-7B-Instruct"
    assert resolve_llm("/data/models/my-llm") == "/data/models/my-llm"
    assert resolve_llm("org/some-model") == "org/some-model"


def test_resolve_vision_tower_presets_and_local_env(monkeypatch, tmp_path):
    assert resolve_vision_tower("siglip2-so16") == "google/siglip2-so400m-patch16-384"
    assert resolve_vision_tower("/data/towers/x") == "/data/towers/x"
    monkeypatch.delenv("PIVOT_MOCO_V3_B16", raising=False)
    with pytest.raises(ValueError, match="'moco-v3-b16' needs a local checkpoint: set PIVOT_MOCO_V3_B16"):
        resolve_vision_tower("moco-v3-b16")
    monkeypatch.setenv("PIVOT_MOCO_V3_B16", str(tmp_path))
    assert resolve_vision_tower("moco-v3-b16") == str(tmp_path)
    assert split_ensemble("siglip2-so16 + dinov2-l") == [
        "google/siglip2-so400m-patch16-384",
        "facebook/dinov2-large",
    ]
