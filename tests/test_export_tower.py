"""Tower-only export: the original-encoder baseline (llava.export.export_vision_tower, `--vision_tower`).

Reference: an MLLM built by `build_model` with the same tower and flags. A forward pre-hook on its projector
records what the projector receives when the MLLM itself encodes the images (`get_image_features` on its own
image processor's pixels). The export is read only through `analysis.features.extract_features` from the raw
images (its own image processor, tokens pooling, float32): the two must be equal bit for bit, for every
encoder family the builder supports, so the "original" encoder is read at the MLLM's feature point.
The scripts' BASELINE_TOWER path is checked with PYTHON=echo and once with a real tiny export.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file

from analysis.features import FeatureOptions, extract_features
from analysis.image_sources import array_source
from llava.export import export_model, export_vision_tower, main, read_export
from llava.model.builder import ModelConfig, build_model

REPO = Path(__file__).parents[1]
TOKENS = FeatureOptions(feature_points=("encoder",), pooling=("tokens",), token_dtype="float32")
PROVENANCE = ("source_checkpoint", "global_step", "loss_type", "llm")

# (tower, mm_vision_select_layer, mm_vision_select_feature, image_aspect_ratio): every registry family at its
# default feature point, post-norm families read pre-norm, ensembles, anyres, a preset name (a kept CLS token:
# test_cls_patch_tower_export_matches_the_mllm).
CASES = [
    *[(tower, None, "patch", "square") for tower in ("siglip", "clip", "dinov2", "dinov2_reg", "mae", "vit")],
    ("convnext", None, "patch", "square"),
    ("siglip+dinov2", None, "patch", "square"),
    ("dinov2+siglip", None, "patch", "square"),
    ("dinov2", -2, "patch", "square"),
    ("vit", -2, "patch", "square"),
    ("siglip", -3, "patch", "square"),
    ("siglip", None, "patch", "anyres_max_9"),
    ("clip", None, "patch", "anyres_max_9"),  # the base tile is a direct resize, not CLIP's centre crop
    ("moco-v3-b16", None, "patch", "square"),
]


@pytest.fixture(scope="module")
def images() -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((20, 70), (45, 32))]


@pytest.fixture(scope="module")
def moco_dir(tiny_dir, tmp_path_factory) -> Path:
    """A MoCo-v3-like converted checkpoint (HF ViT layout) without a preprocessor config: the preset's own
    preprocessing (presets.PRESET_PREPROCESSING, a centre crop) must be used by both paths."""
    out = tmp_path_factory.mktemp("moco")
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_dir / "vit" / name, out / name)
    return out


def _tower_name(tower: str, tiny_dir: Path, moco_dir: Path, monkeypatch) -> str:
    if tower == "moco-v3-b16":
        monkeypatch.setenv("PIVOT_MOCO_V3_B16", str(moco_dir))
        return tower
    return "+".join(str(tiny_dir / part) for part in tower.split("+"))


def _projector_inputs(model, processor, images: list[np.ndarray], anyres: bool) -> torch.Tensor:
    """What the MLLM's projector receives for each image (anyres: the base tile, the first of its tiles)."""
    captured: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(
        lambda module, args: captured.append(args[0].detach().clone())
    )
    try:
        with torch.no_grad():
            if not anyres:
                pixels = processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")
                model.model.get_image_features(pixel_values=pixels["pixel_values"])
                return captured[0]
            for image in images:
                batch = processor(images=[Image.fromarray(image)], return_tensors="pt")
                model.model.get_image_features(
                    pixel_values=batch["pixel_values"], image_sizes=batch["image_sizes"]
                )
            return torch.cat([tiles[:1] for tiles in captured])
    finally:
        hook.remove()


@pytest.mark.parametrize(("tower", "select_layer", "select_feature", "aspect"), CASES)
def test_tower_export_is_read_at_the_mllm_feature_point(
    tiny_dir, moco_dir, images, tmp_path, monkeypatch, tower, select_layer, select_feature, aspect
):
    name = _tower_name(tower, tiny_dir, moco_dir, monkeypatch)
    flags = {
        "mm_vision_select_layer": select_layer,
        "mm_vision_select_feature": select_feature,
        "image_aspect_ratio": aspect,
    }
    torch.manual_seed(0)
    model, _, processor = build_model(ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=name, **flags))
    model.eval()
    expected = _projector_inputs(model, processor, images, anyres=aspect != "square")

    out = export_vision_tower(name, tmp_path / "original", **flags)
    features = extract_features(
        out, array_source(images), TOKENS, cache_dir=None, device="cpu", progress=False
    )
    got = torch.from_numpy(np.asarray(features["encoder.tokens"]))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() == 0.0

    meta = read_export(out)
    assert {k: meta[k] for k in PROVENANCE} == {"source_checkpoint": None, "global_step": -1, "loss_type": None,
                                                 "llm": None}  # fmt: skip
    assert meta["vision_tower"] == name and not (out / "projector").exists()
    # The MLLM's own export (llava.export.export_model) describes and stores the same encoder.
    mllm = export_model(model, processor, tmp_path / "mllm", source_checkpoint=tmp_path)
    assert {k: v for k, v in meta.items() if k not in PROVENANCE} == {
        k: v for k, v in read_export(mllm).items() if k not in PROVENANCE
    }
    ours, theirs = (load_file(d / "vision_encoder" / "model.safetensors") for d in (out, mllm))
    # MAE checkpoints have no pooler: ViTModel gives it fresh random weights (frozen, off the feature path).
    fresh = "pooler." if tower == "mae" else None
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours if not (fresh and k.startswith(fresh)))
    configs = [
        json.loads((d / "vision_encoder" / "preprocessor_config.json").read_text()) for d in (out, mllm)
    ]
    assert configs[0] == configs[1]


def test_cls_patch_tower_export_matches_the_mllm(tiny_dir, images, tmp_path):
    """A kept CLS token (cls_patch), read as docs/CONTRACTS.md §1 says with transformers alone, and by
    analysis.features as patch tokens (the CLS token left out)."""
    name = str(tiny_dir / "clip")
    torch.manual_seed(0)
    model, _, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=name, mm_vision_select_feature="cls_patch")
    )
    expected = _projector_inputs(model.eval(), processor, images, anyres=False)
    out = export_vision_tower(name, tmp_path / "original", mm_vision_select_feature="cls_patch")
    meta = read_export(out)
    encoder = transformers.AutoModel.from_pretrained(out / "vision_encoder").eval()
    exported_processor = transformers.AutoImageProcessor.from_pretrained(out / "vision_encoder")
    pixels = exported_processor(images=[Image.fromarray(i) for i in images], return_tensors="pt")[
        "pixel_values"
    ]
    with torch.no_grad():
        hidden = encoder(pixels, output_hidden_states=True).hidden_states[meta["feature_layer"]]
    got = hidden[:, meta["num_prefix_tokens"] :]
    assert got.shape == expected.shape == (2, 17, 32) and meta["tokens_per_image"] == 17
    assert (got - expected).abs().max().item() == 0.0
    # analysis.features reads the export's patch tokens: the MLLM's tokens without the leading CLS token
    patches = extract_features(
        out, array_source(images), TOKENS, cache_dir=None, device="cpu", progress=False
    )
    assert (torch.as_tensor(patches["encoder.tokens"]) - expected[:, 1:]).abs().max().item() == 0.0


def test_plain_tower_directory_is_not_the_mllm_feature_point(tiny_dir, images, tmp_path):
    """Why the baseline needs the export: the hub directory is read at its last layer, the MLLM at -2."""
    out = export_vision_tower(str(tiny_dir / "siglip"), tmp_path / "original")
    exported = extract_features(
        out, array_source(images), TOKENS, cache_dir=None, device="cpu", progress=False
    )
    plain = extract_features(
        tiny_dir / "siglip", array_source(images), TOKENS, cache_dir=None, device="cpu", progress=False
    )
    assert exported["encoder.tokens"].shape == plain["encoder.tokens"].shape
    assert not np.allclose(exported["encoder.tokens"], plain["encoder.tokens"], atol=1e-3)
    assert read_export(out)["mm_vision_select_layer"] == -2


def test_projector_features_of_a_tower_export_are_a_clear_error(tiny_dir, images, tmp_path):
    out = export_vision_tower(str(tiny_dir / "clip"), tmp_path / "original")
    options = FeatureOptions(feature_points=("encoder", "projector"), pooling=("mean",))
    with pytest.raises(ValueError, match="projector feature point asked for but no projector"):
        extract_features(out, array_source(images), options, cache_dir=None, device="cpu", progress=False)


def test_tower_export_refuses_a_directory_with_a_projector(tiny_dir, tmp_path):
    (tmp_path / "old" / "projector").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="stale projector"):
        export_vision_tower(str(tiny_dir / "siglip"), tmp_path / "old")


def test_cli_tower_form_equals_the_function(tiny_dir, tmp_path, capsys):
    flags = [
        "--mm_vision_select_layer",
        "-3",
        "--mm_vision_select_feature",
        "patch",
        "--image_aspect_ratio",
        "square",
    ]
    main(["--vision_tower", str(tiny_dir / "clip"), str(tmp_path / "cli"), *flags])
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    export_vision_tower(str(tiny_dir / "clip"), tmp_path / "api", mm_vision_select_layer=-3)
    assert read_export(tmp_path / "cli") == read_export(tmp_path / "api")
    assert read_export(tmp_path / "cli")["mm_vision_select_layer"] == -3
    cli, api = (load_file(tmp_path / d / "vision_encoder" / "model.safetensors") for d in ("cli", "api"))
    assert cli.keys() == api.keys() and all(torch.equal(cli[k], api[k]) for k in cli)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["ckpt", "out", "--vision_tower", "siglip2-so16"], "takes OUT_DIR only"),
        (["--vision_tower", "siglip2-so16", "out", "--loss_type", "dpo"], "--loss_type"),
        (["out"], "give CHECKPOINT OUT_DIR, or --vision_tower"),
        (
            ["ckpt", "out", "--mm_vision_select_layer", "-2"],
            "--mm_vision_select_layer only apply with --vision_tower",
        ),
        (["a", "b", "c"], "give CHECKPOINT OUT_DIR"),
    ],
)
def test_cli_forms_are_mutually_exclusive(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.slow  # a fresh Python process imports torch and transformers (~8 s)
def test_console_script_exports_a_tower(tiny_dir, tmp_path):
    """`pivot-export` (setup.py console script -> llava.export:main) in a fresh process."""
    script = Path(sys.executable).with_name("pivot-export")
    assert script.exists(), f"{script}: install the package (pip install -e .) to get the console script"
    done = subprocess.run(
        [str(script), "--vision_tower", str(tiny_dir / "dinov2"), str(tmp_path / "original")],
        capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    meta = read_export(tmp_path / "original")
    assert (meta["encoder_family"], meta["requires_import"], meta["loss_type"]) == (
        "multi_tower",
        "llava.model",
        None,
    )


# ---- scripts/eval: BASELINE_TOWER ------------------------------------------------------------------------
def _run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BASELINE_")}
    clean.pop("SEEDS", None)
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "eval" / name)], env={**clean, **env}, capture_output=True, text=True
    )


def _lines(output: str, module: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith(f"-m {module} ")]


@pytest.mark.parametrize(
    ("script", "module", "encoders_var"),
    [
        ("linear_probe.sh", "analysis.linear_probe", "ENCODERS"),
        ("seg_probe.sh", "analysis.seg_probe", "ENCODERS"),
        ("alignment.sh", "analysis.alignment", "VISION"),
    ],
)
def test_scripts_add_the_original_encoder_only_when_asked(tmp_path, script, module, encoders_var):
    runs = {
        encoders_var: "sft=/r/sft/export dpo=/r/dpo/export",
        "PYTHON": "echo",
        "OUTPUT_DIR": str(tmp_path),
    }
    default = _run_script(script, runs)
    assert default.returncode == 0, default.stderr
    assert not _lines(default.stdout, "llava.export")
    assert "original" not in default.stdout.replace(str(tmp_path), "TMP")

    asked = _run_script(
        script,
        {**runs, "BASELINE_TOWER": "siglip2-so16", "BASELINE_EXPORT_ARGS": "--mm_vision_select_layer -2"},
    )
    assert asked.returncode == 0, asked.stderr
    baseline = tmp_path / "original_encoder"
    assert _lines(asked.stdout, "llava.export") == [
        f"-m llava.export --vision_tower siglip2-so16 {baseline} --mm_vision_select_layer -2"
    ]
    analyses = _lines(asked.stdout, module)
    # The trained runs' command is unchanged apart from the baseline joining it (the linear probe skips the
    # projector point for an encoder without one: tests/test_linear_probe.py).
    assert len(analyses) == 1
    if script == "alignment.sh":
        assert f"--vision sft=/r/sft/export dpo=/r/dpo/export original={baseline} --language" in analyses[0]
    else:
        joined = f"--encoders /r/sft/export /r/dpo/export {baseline} --run_names sft dpo original "
        assert analyses[0] == _lines(default.stdout, module)[0].replace(
            "--encoders /r/sft/export /r/dpo/export --run_names sft dpo ", joined
        )


def test_seg_probe_baseline_refuses_the_projector_feature_point(tmp_path):
    env = {
        "PYTHON": "echo",
        "OUTPUT_DIR": str(tmp_path),
        "BASELINE_TOWER": "siglip2-so16",
        "FEATURE_POINT": "projector",
    }
    done = _run_script("seg_probe.sh", env)
    assert done.returncode != 0 and "no projector" in done.stderr
    assert not _lines(done.stdout, "llava.export")


@pytest.mark.slow  # a fresh Python process imports torch and transformers (~8 s)
def test_linear_probe_script_exports_a_real_baseline(tiny_dir, tmp_path):
    """PYTHON runs llava.export for real and echoes the analysis: the probed directory is a tower export."""
    wrapper = tmp_path / "python"
    wrapper.write_text(
        f'#!/usr/bin/env bash\nif [ "$2" = llava.export ]; then exec {sys.executable} "$@"; fi\necho "$@"\n'
    )
    wrapper.chmod(0o755)
    env = {"PYTHON": str(wrapper), "OUTPUT_DIR": str(tmp_path / "out"), "BASELINE_TOWER": str(tiny_dir / "siglip"),
           "ENCODERS": "sft=/r/sft/export", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    done = _run_script("linear_probe.sh", env)
    assert done.returncode == 0, done.stderr
    baseline = tmp_path / "out" / "original_encoder"
    meta = read_export(baseline)
    assert (meta["vision_tower"], meta["mm_vision_select_layer"], meta["loss_type"]) == (
        str(tiny_dir / "siglip"),
        -2,
        None,
    )
    analyses = _lines(done.stdout, "analysis.linear_probe")
    assert (
        len(analyses) == 1 and f"--encoders /r/sft/export {baseline} --run_names sft original " in analyses[0]
    )
