"""Feature extraction: token selection per encoder family, poolings, projector point, sources and the cache."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import analysis.features as features
from analysis import image_sources
from analysis.features import FeatureOptions, extract_features
from analysis.image_sources import array_source, image_folder_source

SIZE, PATCH = 16, 4  # 4 x 4 = 16 patch tokens


def _save_encoder(path: Path, family: str) -> Path:
    import transformers

    torch.manual_seed(0)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=SIZE, patch_size=PATCH)  # fmt: skip
    if family == "siglip":
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**common))
        processor = transformers.SiglipImageProcessorPil(size={"height": SIZE, "width": SIZE})
    elif family == "vit":
        model = transformers.ViTModel(transformers.ViTConfig(**common), add_pooling_layer=False)
        processor = transformers.ViTImageProcessorPil(size={"height": SIZE, "width": SIZE})
    elif family == "dinov2_registers":
        config = transformers.Dinov2WithRegistersConfig(**common, num_register_tokens=2)
        model = transformers.Dinov2WithRegistersModel(config)
        processor = transformers.ViTImageProcessorPil(size={"height": SIZE, "width": SIZE})
    elif family == "vit_mae":
        model = transformers.ViTMAEModel(transformers.ViTMAEConfig(**common))
        processor = transformers.ViTImageProcessorPil(size={"height": SIZE, "width": SIZE})
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


def _save_export(path: Path) -> Path:
    """An exported encoder per docs/CONTRACTS.md §1: tiny SigLIP tower + mlp2x_gelu projector + export.json."""
    from safetensors.torch import save_file

    _save_encoder(path / "vision_encoder", "siglip")
    (path / "projector").mkdir()
    config = {"projector_type": "mlp2x_gelu", "in_features": 32, "hidden_features": 24, "out_features": 24,
              "act": "gelu", "bias": True}  # fmt: skip
    (path / "projector" / "config.json").write_text(json.dumps(config))
    generator = torch.Generator().manual_seed(1)
    weights = {"linear_1.weight": torch.randn(24, 32, generator=generator), "linear_1.bias": torch.randn(24, generator=generator),
               "linear_2.weight": torch.randn(24, 24, generator=generator), "linear_2.bias": torch.randn(24, generator=generator)}  # fmt: skip
    save_file(weights, path / "projector" / "model.safetensors")
    export = {"format_version": 1, "source_checkpoint": "ckpt", "global_step": 7, "loss_type": "dpo", "llm": "tiny-qwen",
              "vision_tower": "tiny-siglip", "encoder_family": "siglip", "image_size": SIZE, "patch_size": PATCH,
              "grid": [4, 4], "tokens_per_image": 16, "hidden_size": 32, "feature_layer": -1, "num_prefix_tokens": 0,
              "mm_vision_select_layer": -1, "visual_features": "hidden_states[-1][:, 0:]"}  # fmt: skip
    (path / "export.json").write_text(json.dumps(export))
    return path


@pytest.fixture(scope="module")
def encoders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("encoders")
    paths = {
        family: _save_encoder(root / family, family)
        for family in ("siglip", "vit", "dinov2_registers", "vit_mae")
    }
    paths["export"] = _save_export(root / "export")
    return paths


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(5, 20, 26, 3), dtype=np.uint8)


def _reference_hidden(model_dir: Path, images: np.ndarray, **forward_kwargs) -> tuple[torch.Tensor, ...]:
    """Independent reference: HF processor + model called directly."""
    from transformers import AutoImageProcessor, AutoModel

    processor = AutoImageProcessor.from_pretrained(model_dir, backend="pil")
    model = AutoModel.from_pretrained(model_dir, **forward_kwargs.pop("load", {})).eval()
    pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True, **forward_kwargs).hidden_states


@pytest.mark.parametrize(("family", "prefix"), [("siglip", 0), ("vit", 1), ("dinov2_registers", 3)])
def test_visual_tokens_drop_detected_prefix_tokens(
    encoders: dict[str, Path], images: np.ndarray, family: str, prefix: int
) -> None:
    pooling = ("mean", "tokens") if prefix == 0 else ("mean", "cls", "tokens")
    result = extract_features(
        encoders[family],
        array_source(images),
        FeatureOptions(pooling=pooling),
        cache_dir=None,
        progress=False,
    )
    hidden = _reference_hidden(encoders[family], images)[-1]
    assert hidden.shape[1] == 16 + prefix
    np.testing.assert_allclose(
        result["encoder.tokens"], hidden[:, prefix:].numpy(), atol=2e-2
    )  # float16 storage
    np.testing.assert_allclose(
        result["encoder.mean"], hidden[:, prefix:].mean(1).numpy(), rtol=1e-4, atol=1e-5
    )
    if prefix:
        np.testing.assert_allclose(result["encoder.cls"], hidden[:, 0].numpy(), rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(ValueError, match="no CLS token"):
            extract_features(
                encoders[family], array_source(images), FeatureOptions(pooling=("cls",)), cache_dir=None
            )


def test_mae_runs_unmasked_and_unshuffled(encoders: dict[str, Path], images: np.ndarray) -> None:
    options = FeatureOptions(pooling=("tokens",), token_dtype="float32")
    result = extract_features(
        encoders["vit_mae"], array_source(images), options, cache_dir=None, progress=False
    )
    noise = torch.arange(16).expand(len(images), -1).float()
    hidden = _reference_hidden(encoders["vit_mae"], images, noise=noise, load={"mask_ratio": 0.0})[-1]
    assert result["encoder.tokens"].shape == (5, 16, 32)
    np.testing.assert_allclose(result["encoder.tokens"], hidden[:, 1:].numpy(), rtol=1e-4, atol=1e-5)


def test_export_projector_point_and_per_layer_features(encoders: dict[str, Path], images: np.ndarray) -> None:
    from safetensors.torch import load_file

    options = FeatureOptions(feature_points=("encoder", "projector"), pooling=("mean",), layers=(1,))
    result = extract_features(
        encoders["export"], array_source(images), options, cache_dir=None, progress=False
    )
    hidden_states = _reference_hidden(encoders["export"] / "vision_encoder", images)
    weights = load_file(encoders["export"] / "projector" / "model.safetensors")
    tokens = hidden_states[-1]
    hidden = torch.nn.functional.gelu(tokens @ weights["linear_1.weight"].T + weights["linear_1.bias"])
    projected = hidden @ weights["linear_2.weight"].T + weights["linear_2.bias"]
    np.testing.assert_allclose(result["projector.mean"], projected.mean(1).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(result["encoder.mean"], tokens.mean(1).numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(
        result["encoder.layer1.mean"], hidden_states[1].mean(1).numpy(), rtol=1e-4, atol=1e-5
    )
    spec = features.read_encoder_spec(encoders["export"])
    assert spec.run_labels == {
        "run": "export",
        "loss_type": "dpo",
        "vision_tower": "tiny-siglip",
        "llm": "tiny-qwen",
        "global_step": 7,
    }
    with pytest.raises(ValueError, match="no projector"):
        extract_features(encoders["siglip"], array_source(images), options, cache_dir=None)


def test_feature_cache_second_run_does_not_call_encoder(
    encoders: dict[str, Path], images: np.ndarray, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = FeatureOptions(feature_points=("encoder", "projector"), pooling=("mean", "tokens"))
    calls = []
    real_load = features.load_encoder
    monkeypatch.setattr(features, "load_encoder", lambda *a, **k: calls.append(1) or real_load(*a, **k))
    first = extract_features(
        encoders["export"], array_source(images, labels=[0, 1, 0, 1, 2]), options, tmp_path, progress=False
    )
    assert calls == [1]

    def forbidden(*args, **kwargs):
        raise AssertionError("the encoder was loaded although the features are cached")

    monkeypatch.setattr(features, "load_encoder", forbidden)
    monkeypatch.setattr(features.LoadedEncoder, "hidden_states", forbidden)
    second = extract_features(
        encoders["export"], array_source(images.copy(), labels=[0, 1, 0, 1, 2]), options, tmp_path
    )
    for name in first.arrays:
        np.testing.assert_array_equal(first[name], second[name])
    np.testing.assert_array_equal(second.labels, [0, 1, 0, 1, 2])
    # the same pixels labelled otherwise: cached features, but the new labels (not the first run's)
    relabelled = extract_features(
        encoders["export"], array_source(images, labels=[4, 3, 2, 1, 0]), options, tmp_path
    )
    np.testing.assert_array_equal(relabelled.labels, [4, 3, 2, 1, 0])
    # other pixels or other options are other cache entries
    with pytest.raises(AssertionError, match="cached"):
        extract_features(encoders["export"], array_source(images[::-1].copy()), options, tmp_path)
    with pytest.raises(AssertionError, match="cached"):
        extract_features(encoders["export"], array_source(images), FeatureOptions(layers=(1,)), tmp_path)


def test_image_folder_hf_dataset_and_square_crop_sources(
    encoders: dict[str, Path], images: np.ndarray, tmp_path: Path
) -> None:
    import datasets

    folder = tmp_path / "folder"
    for i, image in enumerate(images):
        (folder / ("cat" if i < 2 else "dog")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / ("cat" if i < 2 else "dog") / f"{i}.png")
    source = image_folder_source(folder)
    assert source.class_names == ["cat", "dog"] and source.labels.tolist() == [0, 0, 1, 1, 1]
    features_info = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=["cat", "dog"])}
    )
    records = {"image": [Image.fromarray(i) for i in images], "label": [0, 0, 1, 1, 1]}
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(records, features=features_info)}).save_to_disk(
        tmp_path / "hf"
    )
    hf_source = image_sources.hf_dataset_source(tmp_path / "hf", "train")
    assert hf_source.class_names == ["cat", "dog"] and hf_source.labels.tolist() == [0, 0, 1, 1, 1]
    options = FeatureOptions(pooling=("mean",))
    from_folder = extract_features(encoders["siglip"], source, options, cache_dir=None, progress=False)
    from_hf = extract_features(encoders["siglip"], hf_source, options, cache_dir=None, progress=False)
    from_arrays = extract_features(
        encoders["siglip"], array_source(images), options, cache_dir=None, progress=False
    )
    np.testing.assert_allclose(from_folder["encoder.mean"], from_arrays["encoder.mean"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(from_hf["encoder.mean"], from_arrays["encoder.mean"], rtol=1e-5, atol=1e-6)
    # square crop: the centred 20x20 square of each 20x26 image, resized to the input size
    cropped = np.stack(
        [np.asarray(Image.fromarray(i[:, 3:23]).resize((SIZE, SIZE), Image.BICUBIC)) for i in images]
    )
    squared = extract_features(
        encoders["siglip"], array_source(images).with_square_crop(), options, cache_dir=None, progress=False
    )
    reference = _reference_hidden(encoders["siglip"], cropped)[-1].mean(1).numpy()
    np.testing.assert_allclose(squared["encoder.mean"], reference, rtol=1e-4, atol=1e-5)
    (folder / "dog" / "notes.txt").write_text("not an image")
    with pytest.raises(ValueError, match="notes.txt"):
        image_folder_source(folder)
