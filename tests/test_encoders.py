"""The vision-encoder registry (llava.model.encoders) and the multi-tower wrapper (llava.model.multi_tower).

Every test that loops over encoders is parametrized over `ENCODER_FAMILIES`, so a new entry is tested
automatically. References are independent of the registry: the FULL tower loaded with plain
transformers (`AutoModel.from_pretrained` on the same directory), hand-counted prefix tokens, the
feature point PIVOT reads (DINOv2 `last_hidden_state`, timm `forward_features` for MAE/MoCo/ViT: after
the final norm; CLIP/SigLIP: LLaVA's pre-norm `hidden_states[layer]`), and HF `ViTMAEModel` run with
ordered noise for MAE.
"""

from __future__ import annotations

import pytest
import torch
import transformers
from PIL import Image

from llava.model.encoders import (
    ENCODER_FAMILIES,
    family_for_config,
    load_vision_tower,
    resolve_select_layer,
    tower_features,
)
from llava.model.multi_tower import PivotMultiTower

FAMILIES = sorted(ENCODER_FAMILIES)
BATCH = 2
# Families PIVOT reads after their final norm at the last layer (DINOv2 last_hidden_state, timm forward_features).
POST_NORM_AT_LAST_LAYER = {"dinov2", "dinov2_reg", "mae", "vit"}


def _image_size(config) -> int:
    size = config.image_size
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def _feature_width(config) -> int:
    return int(config.hidden_sizes[-1] if hasattr(config, "hidden_sizes") else config.hidden_size)


def _pixels(size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(BATCH, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _full_tower(path) -> transformers.PreTrainedModel:
    """The untruncated tower as plain transformers loads it (MAE: unmasked, see `_run_full`)."""
    config = transformers.AutoConfig.from_pretrained(path)
    extra = {"mask_ratio": 0.0} if config.model_type == "vit_mae" else {}
    return transformers.AutoModel.from_pretrained(path, **extra).eval()


def _ordered_noise(model, batch: int) -> torch.Tensor:
    """ViTMAE noise that keeps the patch order: argsort(arange) is the identity permutation."""
    patches = (_image_size(model.config) // model.config.patch_size) ** 2
    return torch.arange(patches, dtype=torch.float32).repeat(batch, 1)


def _run_full(model, pixels: torch.Tensor):
    extra = (
        {"noise": _ordered_noise(model, len(pixels))} if isinstance(model, transformers.ViTMAEModel) else {}
    )
    with torch.no_grad():
        return model(pixels, output_hidden_states=True, **extra)


def _as_tokens(hidden: torch.Tensor) -> torch.Tensor:
    """[B, C, H, W] feature maps as row-major tokens; token sequences unchanged."""
    return hidden.flatten(2).transpose(1, 2) if hidden.dim() == 4 else hidden


def _expected_feature_point(name: str, full_output, select_layer: int) -> torch.Tensor:
    """What the projector should read from the FULL tower's output (module docstring)."""
    depth = len(full_output.hidden_states) - 1
    last = select_layer in (-1, depth)
    if name in POST_NORM_AT_LAST_LAYER and last:
        return full_output.last_hidden_state
    return _as_tokens(full_output.hidden_states[select_layer])


@pytest.fixture(scope="module")
def full_towers(tiny_dir) -> dict[str, transformers.PreTrainedModel]:
    return {name: _full_tower(tiny_dir / name) for name in FAMILIES}


# ---------------------------------------------------------------- every registry entry


@pytest.mark.parametrize("name", FAMILIES)
def test_visual_tokens_shape_and_count(tiny_dir, full_towers, name):
    tower, family, _ = load_vision_tower(str(tiny_dir / name))
    assert family.name == name
    size = _image_size(tower.config)
    pixels = _pixels(size)
    with torch.no_grad():
        features = tower_features(tower, pixels, family.num_prefix_tokens(tower.config))
    tokens = family.tokens_per_image(tower.config)
    assert features.shape == (BATCH, tokens, _feature_width(tower.config))

    full_last = _run_full(full_towers[name], pixels).hidden_states[-1]
    if family.output == "feature_map":  # [B, C, H, W]: one token per cell of the last-stage map
        assert tokens == full_last.shape[-2] * full_last.shape[-1]
    else:  # standard patchify; whatever else the full tower emits is prefix (CLS, registers)
        patches = (size // tower.config.patch_size) ** 2
        assert tokens == patches
        assert family.num_prefix_tokens(tower.config) == full_last.shape[1] - patches


@pytest.mark.parametrize("name", FAMILIES)
def test_gradient_reaches_every_trainable_parameter(tiny_dir, name):
    tower, family, _ = load_vision_tower(str(tiny_dir / name))
    size = _image_size(tower.config)
    weights = torch.randn(BATCH, family.tokens_per_image(tower.config), _feature_width(tower.config))
    (tower_features(tower, _pixels(size), family.num_prefix_tokens(tower.config)) * weights).sum().backward()
    params = dict(tower.named_parameters())
    trainable = {n for n, p in params.items() if p.requires_grad}
    assert trainable
    missing = sorted(n for n in trainable if params[n].grad is None)
    assert not missing, f"{name}: trainable parameters without gradient: {missing}"
    assert all(torch.isfinite(params[n].grad).all() for n in trainable)

    # Frozen = exactly the parameters on no feature path, plus those fixed by design (on the path).
    frozen = set(params) - trainable
    tower.zero_grad(set_to_none=True)
    for p in params.values():
        p.requires_grad_(True)
    (tower_features(tower, _pixels(size), family.num_prefix_tokens(tower.config)) * weights).sum().backward()
    reached = {n for n, p in params.items() if p.grad is not None}
    fixed = set(family.frozen_parameters)
    assert fixed <= reached
    assert frozen == (set(params) - reached) | fixed


@pytest.mark.parametrize("select_layer", [-2, -1, 1])
@pytest.mark.parametrize("name", FAMILIES)
def test_select_layer_matches_full_tower_hidden_state(tiny_dir, full_towers, name, select_layer):
    family = ENCODER_FAMILIES[name]
    if family.output == "feature_map" and select_layer != -1:
        with pytest.raises(ValueError, match="only support mm_vision_select_layer=-1"):
            load_vision_tower(str(tiny_dir / name), select_layer)
        return
    tower, _, used = load_vision_tower(str(tiny_dir / name), select_layer)
    assert used == select_layer
    pixels = _pixels(_image_size(tower.config), seed=1)
    with torch.no_grad():
        ours = tower_features(tower, pixels, 0)  # every token, prefix included
    reference = _expected_feature_point(name, _run_full(full_towers[name], pixels), select_layer)
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)
    if family.output == "tokens":  # truncated, not merely read at an earlier layer
        depth = full_towers[name].config.num_hidden_layers
        assert tower.config.num_hidden_layers == (
            select_layer if select_layer > 0 else depth + 1 + select_layer
        )


@pytest.mark.parametrize("select_layer", [-1, -2])
@pytest.mark.parametrize("name", sorted(POST_NORM_AT_LAST_LAYER))
def test_final_norm_is_trained_exactly_when_it_is_read(tiny_dir, name, select_layer):
    tower, family, _ = load_vision_tower(str(tiny_dir / name), select_layer)
    norm = {n: p for n, p in tower.named_parameters() if n.split(".")[-2] == "layernorm"}
    assert set(norm) == {"layernorm.weight", "layernorm.bias"}
    assert all(p.requires_grad == (select_layer == -1) for p in norm.values())
    weights = torch.randn(BATCH, family.tokens_per_image(tower.config), _feature_width(tower.config))
    prefix = family.num_prefix_tokens(tower.config)
    (tower_features(tower, _pixels(_image_size(tower.config)), prefix) * weights).sum().backward()
    assert all((p.grad is not None) == (select_layer == -1) for p in norm.values())


@pytest.mark.parametrize("name", sorted(POST_NORM_AT_LAST_LAYER))
def test_post_norm_towers_say_so_in_their_config(tiny_dir, tmp_path, name):
    """ViT-layout towers give the post-norm state as hidden_states[-1] in plain transformers (the export
    contract); Dinov2Model ignores `tie_last_hidden_states`, hence `final_norm_in_hidden_states`."""
    tower, family, _ = load_vision_tower(str(tiny_dir / name))
    assert tower.config.tie_last_hidden_states is True
    tower.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        out = loaded(_pixels(_image_size(tower.config), seed=9), output_hidden_states=True)
    in_hidden_states = torch.equal(out.hidden_states[-1], out.last_hidden_state)
    assert in_hidden_states == family.final_norm_in_hidden_states == (name in ("mae", "vit"))


def test_default_select_layers_follow_llava_onevision():
    assert ENCODER_FAMILIES["siglip"].default_select_layer == -2  # penultimate SigLIP layer
    assert ENCODER_FAMILIES["clip"].default_select_layer == -2


@pytest.mark.parametrize("name", FAMILIES)
def test_saved_image_processor_matches_family(tiny_dir, name):
    family = ENCODER_FAMILIES[name]
    config = transformers.AutoConfig.from_pretrained(tiny_dir / name)
    size = _image_size(config)
    processor = transformers.AutoImageProcessor.from_pretrained(tiny_dir / name)
    grey = Image.new("RGB", (3 * size, 2 * size), (51, 102, 204))  # non-square, constant colour
    pixels = processor(grey, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, size, size)
    expected = (torch.tensor([51, 102, 204]) / 255 - torch.tensor(family.mean)) / torch.tensor(family.std)
    torch.testing.assert_close(pixels[0].mean(dim=(1, 2)), expected, rtol=0, atol=1e-3)


# ---------------------------------------------------------------- MAE


def test_mae_tower_equals_vitmae_with_ordered_noise(tiny_dir):
    path = tiny_dir / "mae"
    assert transformers.AutoConfig.from_pretrained(path).mask_ratio == 0.75  # the tower ignores masking
    tower, family, _ = load_vision_tower(str(path))
    assert isinstance(tower, transformers.ViTModel)
    mae = transformers.ViTMAEModel.from_pretrained(path, mask_ratio=0.0).eval()
    pixels = _pixels(_image_size(tower.config), seed=2)
    with torch.no_grad():
        ours = tower(pixels, output_hidden_states=True)
        ordered = mae(pixels, noise=_ordered_noise(mae, BATCH), output_hidden_states=True)
        torch.manual_seed(0)
        shuffled = mae(pixels, output_hidden_states=True)
    assert len(ours.hidden_states) == len(ordered.hidden_states)
    for a, b in zip(ours.hidden_states[:-1], ordered.hidden_states[:-1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ours.last_hidden_state, ordered.last_hidden_state, rtol=1e-5, atol=1e-6)
    # Read at its last layer, the tower's hidden_states[-1] is MAE's output after the final norm.
    torch.testing.assert_close(ours.hidden_states[-1], ordered.last_hidden_state, rtol=1e-5, atol=1e-6)

    # Default ViTMAE forward shuffles patch tokens even at mask_ratio 0: different order, same tokens.
    ours_patches, shuffled_patches = ours.last_hidden_state[:, 1:], shuffled.last_hidden_state[:, 1:]
    assert not torch.allclose(ours_patches, shuffled_patches, atol=1e-3)
    index = shuffled.ids_restore.unsqueeze(-1).expand_as(shuffled_patches)
    torch.testing.assert_close(torch.gather(shuffled_patches, 1, index), ours_patches, rtol=1e-4, atol=1e-5)
    assert not tower.embeddings.position_embeddings.requires_grad  # fixed sin-cos table


# ---------------------------------------------------------------- helpers and errors


def test_resolve_select_layer():
    assert resolve_select_layer(-2, 27) == 26
    assert resolve_select_layer(-1, 27) == 27
    assert resolve_select_layer(-27, 27) == 1
    assert resolve_select_layer(1, 27) == 1
    assert resolve_select_layer(27, 27) == 27
    for bad in (0, -28, 28, -40):
        with pytest.raises(ValueError, match=rf"mm_vision_select_layer={bad} .*27-layer tower.*1\.\.27"):
            resolve_select_layer(bad, 27)


def test_family_for_config_unknown_model_type():
    with pytest.raises(ValueError) as error:
        family_for_config(transformers.BertConfig())
    message = str(error.value)
    assert "No encoder family for model_type 'bert'" in message
    assert "siglip" in message and "dinov2_with_registers" in message
    assert "ENCODER_FAMILIES" in message


@pytest.mark.parametrize("name", ["siglip", "clip"])
def test_full_dual_encoder_checkpoint_loads_its_vision_half(tmp_path, name):
    """Hub SigLIP/CLIP ids are full image-text checkpoints (model_type siglip/clip)."""
    vision = {"hidden_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2, "intermediate_size": 64}
    text = {**vision, "vocab_size": 99}
    vision_kwargs = {**vision, "image_size": 32, "patch_size": 8}
    if name == "siglip":
        config = transformers.SiglipConfig(text_config=text, vision_config=vision_kwargs)
        full_class = transformers.SiglipModel
    else:
        config = transformers.CLIPConfig(text_config=text, vision_config=vision_kwargs, projection_dim=16)
        full_class = transformers.CLIPModel
    torch.manual_seed(0)
    full_class(config).save_pretrained(tmp_path)
    tower, family, used = load_vision_tower(str(tmp_path))
    assert (family.name, used, tower.config.num_hidden_layers) == (name, -2, 2)
    full = full_class.from_pretrained(tmp_path).eval()
    pixels = _pixels(32, seed=3)
    with torch.no_grad():
        ours = tower(pixels, output_hidden_states=True).hidden_states[-1]
        reference = full.vision_model(pixels, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(ours, reference, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- multi-tower


def _member(tiny_dir, name: str):
    tower, family, _ = load_vision_tower(str(tiny_dir / name))
    size = _image_size(tower.config)
    return tower, family, size, family.grid_size(tower.config, size)


def test_ensemble_concatenates_members_channelwise(tiny_dir):
    siglip, siglip_family, size, grid = _member(tiny_dir, "siglip")
    dino, dino_family, dino_size, dino_grid = _member(tiny_dir, "dinov2")
    assert (size, grid) == (dino_size, dino_grid)
    wrapper = PivotMultiTower.from_members([(siglip, "siglip", size, grid), (dino, "dinov2", size, grid)])
    pixels = _pixels(size, seed=4)  # normalised for the first member (SigLIP: mean = std = 0.5)
    with torch.no_grad():
        tokens = wrapper(pixels).last_hidden_state
        width = siglip.config.hidden_size
        assert tokens.shape == (BATCH, grid**2, width + dino.config.hidden_size)
        assert wrapper.config.hidden_size == tokens.shape[-1]
        torch.testing.assert_close(tokens[..., :width], tower_features(siglip, pixels, 0))
        raw = pixels * 0.5 + 0.5
        mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (dino_family.mean, dino_family.std))
        dino_tokens = dino((raw - mean) / std).last_hidden_state[:, 1:]  # after the final norm
    torch.testing.assert_close(tokens[..., width:], dino_tokens, rtol=1e-4, atol=1e-5)


def test_ensemble_resamples_members_to_common_grid(tiny_dir):
    siglip, _, size, grid = _member(tiny_dir, "siglip")
    convnext, _, conv_size, conv_grid = _member(tiny_dir, "convnext")
    assert conv_grid != grid
    wrapper = PivotMultiTower.from_members(
        [(siglip, "siglip", size, grid), (convnext, "convnext", conv_size, conv_grid)]
    )
    with torch.no_grad():
        tokens = wrapper(_pixels(size)).last_hidden_state
    assert tokens.shape == (BATCH, grid**2, siglip.config.hidden_size + convnext.config.hidden_sizes[-1])
    assert torch.isfinite(tokens).all()


def test_dinov2_registers_drop_cls_and_four_registers(tiny_dir):
    tower, family, size, grid = _member(tiny_dir, "dinov2_reg")
    assert tower.config.num_register_tokens == 4
    assert family.num_prefix_tokens(tower.config) == 5
    wrapper = PivotMultiTower.from_members([(tower, "dinov2_reg", size, grid)])
    pixels = _pixels(size, seed=5)
    with torch.no_grad():
        out = wrapper(pixels, output_hidden_states=True)
        full = tower(pixels, output_hidden_states=True)
    raw = full.last_hidden_state  # after the final norm
    assert raw.shape[1] == grid**2 + 5
    torch.testing.assert_close(out.last_hidden_state, raw[:, 5:])
    # A lone tower's hidden states keep the plain tower's layout (layer-wise analyses), prefix dropped.
    assert len(out.hidden_states) == len(full.hidden_states) == tower.config.num_hidden_layers + 1
    for ours, plain in zip(out.hidden_states[:-1], full.hidden_states[:-1]):
        torch.testing.assert_close(ours, plain[:, 5:])
    assert out.hidden_states[-1] is out.last_hidden_state


def test_convnext_tokens_are_flattened_last_stage_map(tiny_dir, full_towers):
    tower, family, size, grid = _member(tiny_dir, "convnext")
    wrapper = PivotMultiTower.from_members([(tower, "convnext", size, grid)])
    pixels = _pixels(size, seed=6)
    with torch.no_grad():
        tokens = wrapper(pixels).last_hidden_state
    fmap = _run_full(full_towers["convnext"], pixels).last_hidden_state  # [B, C, h, w], last stage
    batch, channels, height, width = fmap.shape
    assert height * width == grid**2 == family.tokens_per_image(tower.config)
    expected = fmap.permute(0, 2, 3, 1).reshape(batch, height * width, channels)  # row-major cells
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-6)


def test_multi_tower_round_trips_through_auto_model(tiny_dir, tmp_path):
    siglip, _, size, grid = _member(tiny_dir, "siglip")
    reg, _, _, _ = _member(tiny_dir, "dinov2_reg")
    wrapper = PivotMultiTower.from_members([(siglip, "siglip", size, grid), (reg, "dinov2_reg", size, grid)])
    wrapper.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, PivotMultiTower)
    assert loaded.config.model_type == "pivot_multi_tower"
    pixels = _pixels(size, seed=7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixels).last_hidden_state, wrapper(pixels).last_hidden_state)


@pytest.mark.parametrize("select_layer", [-2, -1])
@pytest.mark.parametrize("name", FAMILIES)
def test_truncated_tower_round_trips_through_auto_model(tiny_dir, tmp_path, name, select_layer):
    """The exported encoder (docs/CONTRACTS.md §1) is the truncated tower, reloaded by plain transformers."""
    if ENCODER_FAMILIES[name].output != "tokens" and select_layer != -1:
        pytest.skip("feature-map towers are read at their last stage only")
    tower, _, _ = load_vision_tower(str(tiny_dir / name), select_layer)
    tower.save_pretrained(tmp_path)
    loaded = transformers.AutoModel.from_pretrained(tmp_path).eval()
    assert type(loaded) is type(tower)
    pixels = _pixels(_image_size(tower.config), seed=8)
    with torch.no_grad():
        expected = tower.eval()(pixels, output_hidden_states=True).hidden_states[-1]
        torch.testing.assert_close(loaded(pixels, output_hidden_states=True).hidden_states[-1], expected)
