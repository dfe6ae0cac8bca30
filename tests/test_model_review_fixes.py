"""Model-side review fixes: image processors that agree with the tower, cls_patch, ensemble resampling and
the checkpoints' chat template (llava.model.builder / encoders / multi_tower / chat_template, llava.export).

References are independent of the code under test: preprocessing written out with PIL (PIVOT's
torchvision pipelines: resize, centre crop, normalise), the full tower run with plain transformers, and
the training tokenizer (`llava.data.tokenization.tokenize_prompt`) for the chat template.
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from stage_fixtures import exported_tokens, mllm_tokens

from llava.data.tokenization import tokenize_prompt
from llava.export import export_checkpoint, export_model, read_export
from llava.model.builder import ModelConfig, build_model, save_model
from llava.model.encoders import load_vision_tower, tower_features
from llava.model.image_tokens import image_token_counter
from llava.model.multi_tower import PivotMultiTower
from llava.model.stage3 import Stage3Config, build_stage3_model

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _normalise(image: Image.Image, mean, std) -> torch.Tensor:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)
    return (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def _resize_shortest_then_crop(image: Image.Image, shortest: int, crop: int, resample) -> Image.Image:
    """torchvision Resize(shortest) + CenterCrop(crop), for sizes whose crop offsets are whole numbers."""
    width, height = image.size
    scale = shortest / min(width, height)
    size = (shortest, int(height * scale)) if width <= height else (int(width * scale), shortest)
    resized = image.resize(size, resample)
    left, top = (size[0] - crop) // 2, (size[1] - crop) // 2
    assert (size[0] - crop) % 2 == 0 and (size[1] - crop) % 2 == 0, "pick an image with even crop margins"
    return resized.crop((left, top, left + crop, top + crop))


def _forward_one_image(model, processor, image: Image.Image) -> torch.Tensor:
    """Logits for `<image>` tokens (as many as the model counts) + two text tokens."""
    inputs = processor(images=image, return_tensors="pt")
    count = image_token_counter(model.config)(image.height, image.width)
    ids = torch.tensor([[model.config.image_token_id] * count + [5, 6]])
    extra = {"image_sizes": inputs["image_sizes"]} if "image_sizes" in inputs else {}
    with torch.no_grad():
        return model(input_ids=ids, pixel_values=inputs["pixel_values"], **extra).logits


def _tower_arg(*paths) -> str:
    return "+".join(str(p) for p in paths)


# ---------------------------------------------------------------- 1. processor size follows the tower config


@pytest.fixture(scope="module")
def hub_like(tmp_path_factory) -> dict:
    """Towers whose saved image processor disagrees with the config's image_size, as on the hub."""
    root = tmp_path_factory.mktemp("hub_like")
    torch.manual_seed(0)
    dino = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    transformers.Dinov2Model(dino).save_pretrained(root / "dinov2")
    transformers.BitImageProcessor(  # facebook/dinov2-*: shortest edge 256, crop 224, while the config says 518
        size={"shortest_edge": 40}, crop_size={"height": 24, "width": 24}, do_center_crop=True,
        image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD), resample=3,
    ).save_pretrained(root / "dinov2")  # fmt: skip
    convnext = transformers.ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], image_size=64)
    transformers.ConvNextModel(convnext).save_pretrained(root / "convnext")
    transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875).save_pretrained(
        root / "convnext"
    )
    return {"dinov2": root / "dinov2", "convnext": root / "convnext"}


@pytest.mark.parametrize("members", [("dinov2",), ("convnext",), ("dinov2", "siglip")])
def test_processor_is_forced_to_the_tower_config_size(tiny_dir, hub_like, caplog, members):
    paths = [hub_like.get(name) or tiny_dir / name for name in members]
    with caplog.at_level(logging.WARNING, logger="llava.model.encoders"):
        model, _, processor = build_model(
            ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=_tower_arg(*paths))
        )
    assert "forcing the processor" in caplog.text
    size = transformers.AutoConfig.from_pretrained(paths[0]).image_size
    image = _image(48, 40)
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    assert pixels.shape[-2:] == (size, size)
    if members[0] == "dinov2":  # PIVOT's DINOv2 rule: shortest side = crop = config image_size
        reference = _normalise(
            _resize_shortest_then_crop(image, size, size, Image.BICUBIC), IMAGENET_MEAN, IMAGENET_STD
        )
        torch.testing.assert_close(pixels[0], reference, rtol=0, atol=1e-5)
    assert torch.isfinite(_forward_one_image(model.eval(), processor, image)).all()


def test_forced_processor_is_the_exported_one(tiny_dir, hub_like, tmp_path):
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(hub_like["dinov2"]))
    )
    save_model(model, tokenizer, processor, tmp_path / "ckpt")
    image = _image(48, 40, seed=1)
    expected = processor(images=image, return_tensors="pt")["pixel_values"]
    for out in (
        export_model(model.eval(), processor, tmp_path / "live", source_checkpoint=tmp_path / "ckpt"),
        export_checkpoint(tmp_path / "ckpt", tmp_path / "disk"),
    ):
        exported = transformers.AutoImageProcessor.from_pretrained(out / "vision_encoder")
        assert torch.equal(exported(images=image, return_tensors="pt")["pixel_values"], expected)
        assert read_export(out)["tokens_per_image"] == 16


# ---------------------------------------------------------------- 3. MoCo-v3 preprocessing


def test_moco_preset_without_processor_config_gets_pivot_preprocessing(tiny_dir, tmp_path, monkeypatch):
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=224,
        patch_size=32,
    )
    torch.manual_seed(0)
    transformers.ViTModel(config).save_pretrained(
        tmp_path / "moco"
    )  # a conversion writes no processor config
    monkeypatch.setenv("PIVOT_MOCO_V3_B16", str(tmp_path / "moco"))
    model, _, processor = build_model(ModelConfig(llm=str(tiny_dir / "llm"), vision_tower="moco-v3-b16"))
    image = _image(390, 300)  # → 332x256 after Resize(256): even crop margins
    reference = _resize_shortest_then_crop(image, 256, 224, Image.BILINEAR)  # moco_encoder.py
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(
        pixels[0], _normalise(reference, IMAGENET_MEAN, IMAGENET_STD), rtol=0, atol=1e-5
    )
    assert model.config.image_seq_length == 49


# ---------------------------------------------------------------- 4. cls_patch


def test_cls_patch_square_counts_feeds_and_exports_the_cls_token(tiny_dir, tmp_path):
    model, _, processor = build_model(
        ModelConfig(
            llm=str(tiny_dir / "llm"),
            vision_tower=str(tiny_dir / "clip"),
            mm_vision_select_feature="cls_patch",
        )
    )
    model.eval()
    image = _image(32, 32)
    assert image_token_counter(model.config)(32, 32) == 4 * 4 + 1
    assert torch.isfinite(_forward_one_image(model, processor, image)).all()
    pixels = processor(images=image, return_tensors="pt")["pixel_values"]
    full = transformers.AutoModel.from_pretrained(tiny_dir / "clip").eval()
    with torch.no_grad():  # every token of the full tower's penultimate layer, CLS first
        expected = model.model.multi_modal_projector(
            full(pixels, output_hidden_states=True).hidden_states[-2]
        )
    torch.testing.assert_close(mllm_tokens(model, pixels), expected, rtol=1e-5, atol=1e-6)
    out = export_model(model, processor, tmp_path / "exp", source_checkpoint=tmp_path)
    meta = read_export(out)
    assert (meta["num_prefix_tokens"], meta["tokens_per_image"]) == (0, 17)
    assert torch.allclose(exported_tokens(out, pixels), expected, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="cannot tile"):
        build_stage3_model(
            Stage3Config(str(out), str(tiny_dir / "llm"), image_aspect_ratio="anyres_max_9"), out
        )


def test_cls_patch_is_refused_where_the_cls_token_is_dropped(tiny_dir):
    with pytest.raises(ValueError, match="'square' only"):
        ModelConfig(
            llm="llm",
            vision_tower="clip",
            mm_vision_select_feature="cls_patch",
            image_aspect_ratio="anyres_max_9",
        )
    for tower in ("dinov2", "dinov2_reg", "siglip"):  # read through the wrapper; 5 prefix tokens; no CLS
        with pytest.raises(ValueError, match="needs a single tower with exactly one CLS token"):
            build_model(
                ModelConfig(
                    llm=str(tiny_dir / "llm"),
                    vision_tower=str(tiny_dir / tower),
                    mm_vision_select_feature="cls_patch",
                )
            )


# ---------------------------------------------------------------- 5. SigLIP resampling


def test_siglip_processor_is_forced_to_bicubic(tiny_dir, tmp_path, caplog):
    tower = shutil.copytree(tiny_dir / "siglip", tmp_path / "siglip")
    transformers.SiglipImageProcessor(size={"height": 32, "width": 32}, resample=2).save_pretrained(tower)
    image = _image(50, 40)
    reference = _normalise(image.resize((32, 32), Image.BICUBIC), (0.5,) * 3, (0.5,) * 3)
    for aspect in ("square", "anyres_max_9"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="llava.model.encoders"):
            _, _, processor = build_model(
                ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tower), image_aspect_ratio=aspect)
            )
        assert "resample=2 overridden with bicubic" in caplog.text
        pixels = processor(images=image, return_tensors="pt")["pixel_values"]
        base = pixels[0, 0] if aspect != "square" else pixels[0]  # anyres: the base tile
        torch.testing.assert_close(base, reference, rtol=0, atol=1e-5)


# ---------------------------------------------------------------- 6. anyres export processor


@pytest.mark.parametrize("tower", ["clip", "dinov2"])
def test_anyres_export_processor_reproduces_the_base_tile(tiny_dir, tmp_path, tower):
    model, tokenizer, processor = build_model(
        ModelConfig(
            llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / tower), image_aspect_ratio="anyres_max_9"
        )
    )
    image = _image(100, 40)
    base = processor(images=image, return_tensors="pt")["pixel_values"][0, :1]
    save_model(model, tokenizer, processor, tmp_path / "ckpt")
    for out in (
        export_model(model.eval(), processor, tmp_path / "live", source_checkpoint=tmp_path / "ckpt"),
        export_checkpoint(tmp_path / "ckpt", tmp_path / "disk"),
    ):
        exported = transformers.AutoImageProcessor.from_pretrained(out / "vision_encoder")
        torch.testing.assert_close(
            exported(images=image, return_tensors="pt")["pixel_values"], base, rtol=0, atol=1e-6
        )


# ---------------------------------------------------------------- 7. ensemble resampling


def test_ensemble_downsamples_members_with_antialiasing(tiny_dir):
    convnext, convnext_family, _ = load_vision_tower(str(tiny_dir / "convnext"))
    siglip, _, _ = load_vision_tower(str(tiny_dir / "siglip"))
    wrapper = PivotMultiTower.from_members([(convnext, "convnext", 64, 2), (siglip, "siglip", 32, 4)], grid=4)
    rng = np.random.default_rng(0)
    raw = torch.from_numpy((rng.random((1, 3, 64, 64)) > 0.5).astype(np.float32))  # aliasing-prone noise
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (convnext_family.mean, convnext_family.std))
    with torch.no_grad():
        tokens = wrapper((raw - mean) / std).last_hidden_state
        # PIL's bicubic downsampling is antialiased (independent of torch)
        small = np.stack(
            [np.asarray(Image.fromarray(c, mode="F").resize((32, 32), Image.BICUBIC)) for c in raw[0].numpy()]
        )
        expected = tower_features(siglip, (torch.from_numpy(small)[None].clamp(0, 1) - 0.5) / 0.5, 0)
    torch.testing.assert_close(tokens[..., -siglip.config.hidden_size :], expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- 8. chat template

QWEN25_TEMPLATE = (  # Qwen2.5-Instruct's template without tools (its default system prompt, string content only)
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}{%- if message.role != 'system' or not loop.first %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def test_checkpoint_chat_template_renders_the_training_prompt(tiny_dir, tmp_path):
    llm = shutil.copytree(tiny_dir / "llm", tmp_path / "llm")
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm)
    tokenizer.chat_template = QWEN25_TEMPLATE
    tokenizer.save_pretrained(llm)
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(llm), vision_tower=str(tiny_dir / "siglip"))
    )
    save_model(model, tokenizer, processor, tmp_path / "ckpt")
    question = "What colour is the circle?"
    expected = tokenize_prompt(f"<image>\n{question}", tokenizer, "qwen_1_5", [1])
    system = {"role": "system", "content": "You are a helpful assistant."}
    parts = {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}
    text = {"role": "user", "content": f"<image>\n{question}"}
    for loaded in (tokenizer, transformers.AutoTokenizer.from_pretrained(tmp_path / "ckpt")):
        for messages in ([system, parts], [parts], [system, text], [text]):
            rendered = loaded.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            assert loaded(rendered, add_special_tokens=False)["input_ids"] == expected, messages
