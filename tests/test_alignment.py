"""Feature extraction, prh data and the alignment CLI (analysis.alignment) on tiny models and real MiniLM."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from analysis import alignment as al

os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLORS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}
SHAPES = ("square", "circle")
BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}


SIZES = {"small": 0.3, "large": 0.8}  # shape extent as a fraction of the half-width


def _draw(
    color: tuple[int, int, int], shape: str, background: tuple[int, int, int], extent: float
) -> Image.Image:
    size = 48
    canvas = np.empty((size, size, 3), dtype=np.uint8)
    canvas[:] = background
    yy, xx = np.mgrid[:size, :size] - size / 2
    half = extent * size / 2
    inside = (np.maximum(abs(yy), abs(xx)) < half) if shape == "square" else (yy**2 + xx**2 < half**2)
    canvas[inside] = color
    return Image.fromarray(canvas)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32 generated scenes, each with its own caption, in the prh format (`<root>/prh/prh.jsonl`)."""
    root = tmp_path_factory.mktemp("world")
    (root / "prh" / "images").mkdir(parents=True)
    lines = []
    combos = [(z, c, s, b) for z in SIZES for c in COLORS for s in SHAPES for b in BACKGROUNDS]
    for i, (size, color, shape, background) in enumerate(combos):
        _draw(COLORS[color], shape, BACKGROUNDS[background], SIZES[size]).save(
            root / "prh" / "images" / f"{i:03d}.png"
        )
        caption = f"a {size} {color} {shape} on a {background} background"
        lines.append(json.dumps({"image": f"images/{i:03d}.png", "text": [caption, "another caption"]}))
    (root / "prh" / "prh.jsonl").write_text("\n".join(lines) + "\n")
    return root


def _save_vision(model, processor, path: Path) -> Path:
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import SiglipVisionConfig, SiglipVisionModel
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    torch.manual_seed(0)
    config = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
    )
    processor = SiglipImageProcessorPil(size={"height": 32, "width": 32})
    return _save_vision(SiglipVisionModel(config), processor, tmp_path_factory.mktemp("siglip"))


@pytest.fixture(scope="module")
def export_dir(siglip_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An exported-encoder layout (docs/CONTRACTS.md §1) around the tiny SigLIP tower."""
    root = tmp_path_factory.mktemp("export")
    shutil.copytree(siglip_dir, root / "vision_encoder")
    meta = {"format_version": 1, "loss_type": "dpo", "llm": "tiny-qwen2", "vision_tower": "tiny-siglip",
            "num_prefix_tokens": 0, "feature_layer": -1, "image_size": 32, "patch_size": 8}  # fmt: skip
    (root / "export.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def minilm() -> al.LanguageModel:
    return al.load_language_model(al.minilm_path())


def test_minilm_path_is_the_bundled_model() -> None:
    path = al.minilm_path()
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "bert" and config["hidden_size"] == 384
    assert (path / "model.safetensors").is_file()
    assert al.resolve_model_spec("minilm") == ("minilm", str(path))
    assert al.resolve_model_spec("ref=minilm") == ("ref", str(path))


def test_prh_jsonl_first_caption_and_images(world: Path) -> None:
    data = al.PrhDataset(world)  # a world root resolves to prh/prh.jsonl
    assert len(data) == 32
    assert data.texts[0] == "a small red square on a black background"
    image = data.images([0, 31])[1]
    assert image.mode == "RGB" and image.size == (48, 48)


def test_prh_bad_records_name_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "prh.jsonl"
    bad.write_text(
        json.dumps({"image": "a.png", "text": ["ok"]})
        + "\n"
        + json.dumps({"image": "b.png", "text": "no list"})
        + "\n"
    )
    with pytest.raises(ValueError, match=rf"{bad}:2: 'text' must be a non-empty list"):
        al.PrhDataset(bad)
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match=rf"{bad}:1: invalid JSON"):
        al.PrhDataset(bad)
    bad.write_text(json.dumps({"image": "missing.png", "text": ["x"]}) + "\n")
    with pytest.raises(ValueError, match="missing.png: cannot read image"):
        al.PrhDataset(bad).image(0)
    with pytest.raises(FileNotFoundError, match="no prh data"):
        al.PrhDataset(tmp_path / "nowhere")


def test_prh_local_hf_dataset(world: Path, tmp_path: Path) -> None:
    import datasets

    source = al.PrhDataset(world)
    records = {
        "image": [str(source._paths[i]) for i in range(4)],
        "text": [[t, "x"] for t in source.texts[:4]],
    }
    ds = datasets.Dataset.from_dict(records).cast_column("image", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "hf"))
    data = al.PrhDataset(tmp_path / "hf", split="train")
    assert data.texts == source.texts[:4]
    assert np.array_equal(np.asarray(data.image(2)), np.asarray(source.image(2)))
    with pytest.raises(ValueError, match="split 'test' not found"):
        al.PrhDataset(tmp_path / "hf", split="test")


def test_sample_indices() -> None:
    first = al.sample_indices(100, 10, seed=0)
    assert first == al.sample_indices(100, 10, seed=0) and first == sorted(set(first)) and len(first) == 10
    assert first != al.sample_indices(100, 10, seed=1)
    with pytest.raises(ValueError, match="exceeds the 100 samples"):
        al.sample_indices(100, 1024, seed=0)


def test_masked_mean_ignores_pads_even_nan() -> None:
    hidden = torch.tensor(
        [[[float("nan"), 1.0], [2.0, 4.0], [4.0, 8.0]], [[1.0, 1.0], [3.0, 5.0], [5.0, 0.0]]]
    )
    mask = torch.tensor([[0, 1, 1], [1, 1, 1]])
    assert torch.equal(al.masked_mean(hidden, mask), torch.tensor([[3.0, 6.0], [3.0, 2.0]]))


TEXTS = [
    "a red square",
    "two dogs on a sofa",
    "the quick brown fox jumps over the lazy dog twice",
    "hi",
    "blue",
]


def test_left_padded_batch_equals_single_samples_minilm(minilm: al.LanguageModel) -> None:
    batched = al.language_features(minilm, TEXTS, batch_size=5)
    single = torch.cat([al.language_features(minilm, [t]) for t in TEXTS])
    assert batched.shape == (5, 7, 384)  # embeddings + 6 layers
    assert torch.allclose(batched, single, atol=1e-5)


def test_left_padded_batch_equals_single_samples_causal_lm(minilm: al.LanguageModel) -> None:
    from transformers import AutoModel, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=minilm.tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    lm = al.LanguageModel(AutoModel.from_config(config).eval(), minilm.tokenizer)
    batched = al.language_features(lm, TEXTS, batch_size=5)
    single = torch.cat([al.language_features(lm, [t]) for t in TEXTS])
    assert batched.shape == (5, 3, 32) and not batched.isnan().any()
    assert torch.allclose(batched, single, atol=1e-5)


def _manual_hidden_states(encoder: al.VisionEncoder, images: list[Image.Image]) -> tuple[torch.Tensor, ...]:
    pixels = encoder.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        return encoder.model(pixel_values=pixels, output_hidden_states=True).hidden_states


def test_siglip_features_mean_pool_every_layer(siglip_dir: Path, world: Path) -> None:
    encoder = al.load_vision_encoder(siglip_dir)
    assert type(encoder.processor).__name__ == "SiglipImageProcessorPil"
    assert encoder.num_prefix_tokens == 0
    images = [al.PrhDataset(world).image(i) for i in range(5)]
    feats = al.vision_features(encoder, images, batch_size=2)
    hidden = _manual_hidden_states(encoder, images)
    assert feats.shape == (5, 3, 32) and len(hidden) == 3 and hidden[0].shape[1] == 16
    expected = torch.stack([h.mean(dim=1) for h in hidden], dim=1)
    assert torch.allclose(feats, expected, atol=1e-5)
    with pytest.raises(ValueError, match="needs a CLS token"):
        al.vision_features(encoder, images, pool="cls")


def test_export_dir_loads_tower_and_labels(export_dir: Path, siglip_dir: Path, world: Path) -> None:
    encoder = al.load_vision_encoder(export_dir)
    assert encoder.labels == {"loss_type": "dpo", "vision_tower": "tiny-siglip", "llm": "tiny-qwen2"}
    images = [al.PrhDataset(world).image(i) for i in range(3)]
    direct = al.vision_features(al.load_vision_encoder(siglip_dir), images)
    assert torch.equal(al.vision_features(encoder, images), direct)
    assert al.resolve_model_spec(str(export_dir / "vision_encoder"))[0] == export_dir.name


@pytest.mark.parametrize("family", ["clip", "dinov2_with_registers"])
def test_prefix_tokens_dropped_and_cls_pooling(family: str, tmp_path: Path, world: Path) -> None:
    from transformers import (
        CLIPVisionConfig,
        CLIPVisionModel,
        Dinov2WithRegistersConfig,
        Dinov2WithRegistersModel,
    )
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    torch.manual_seed(0)
    small = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
             "image_size": 32, "patch_size": 8}  # fmt: skip
    size = {"shortest_edge": 32}, {"height": 32, "width": 32}
    if family == "clip":
        model, processor, prefix = (
            CLIPVisionModel(CLIPVisionConfig(**small)),
            CLIPImageProcessorPil(size=size[0], crop_size=size[1]),
            1,
        )
    else:
        config = Dinov2WithRegistersConfig(**small, num_register_tokens=2)
        model, processor, prefix = (
            Dinov2WithRegistersModel(config),
            BitImageProcessorPil(size=size[0], crop_size=size[1]),
            3,
        )
    encoder = al.load_vision_encoder(_save_vision(model, processor, tmp_path / family))
    assert encoder.num_prefix_tokens == prefix
    images = [al.PrhDataset(world).image(i) for i in range(4)]
    hidden = _manual_hidden_states(encoder, images)
    assert hidden[0].shape[1] == prefix + 16
    mean = torch.stack([h[:, prefix:].mean(dim=1) for h in hidden], dim=1)
    cls = torch.stack([h[:, 0] for h in hidden], dim=1)
    assert torch.allclose(al.vision_features(encoder, images), mean, atol=1e-5)
    assert torch.allclose(al.vision_features(encoder, images, pool="cls"), cls, atol=1e-5)


def test_seeds_collapse_when_the_sample_covers_the_dataset(caplog: pytest.LogCaptureFixture) -> None:
    assert al.seeds_to_run([0, 1, 2], 512, 1024) == [0, 1, 2]
    assert al.seeds_to_run([4], 1024, 1024) == [4]
    with caplog.at_level("WARNING", logger="analysis.alignment"):
        assert al.seeds_to_run([3, 1, 2], 1024, 1024) == [3]
    assert "covers all 1024 samples" in caplog.text and "seed 3 only" in caplog.text


def test_table_of_one_seed_shows_no_spread() -> None:
    rows = [{"vision": "sft", "language": "gemma", "metric": "mutual_knn", "k": 10, "seed": 0, "score": 0.25,
             "vision_layer": 1, "language_layer": 2}]  # fmt: skip
    summary = al.summarize(rows)
    assert summary[0]["std"] is None
    table = al.format_table(summary)
    assert "±" not in table and "| sft | 0.2500 (n=1) |" in table and "One seed per cell (n = 1)" in table
    two = al.summarize([rows[0], {**rows[0], "seed": 1, "score": 0.35}])
    # hand: mean 0.30, std (ddof 1) = 0.05 * sqrt(2) = 0.0707
    assert "| sft | 0.3000 ± 0.0707 |" in al.format_table(two)


def test_alignment_script_defaults_to_one_seed(tmp_path: Path) -> None:
    """scripts/eval/alignment.sh: 1024 samples of the 1024-pair prh file -> one seed, logged."""
    script = Path(__file__).parents[1] / "scripts" / "eval" / "alignment.sh"
    env = {k: v for k, v in os.environ.items() if k not in ("SEEDS", "NUM_SAMPLES", "OUTLIER_CLAMP")}
    out = subprocess.run(["bash", str(script)], env={**env, "PYTHON": "echo"}, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert 'NUM_SAMPLES=1024 SEEDS="0" OUTLIER_CLAMP=precise' in out.stdout
    assert "--num_samples 1024 --seeds 0 --pool mean --outlier_clamp precise " in out.stdout


def _reference_best_mutual_knn(vision: np.ndarray, language: np.ndarray, mode: str, k: int) -> float:
    """Independent numpy pipeline: clamp bound per platonic-rep `remove_outliers`, L2, set-based mutual k-NN."""

    def prepared(x: np.ndarray) -> np.ndarray:
        values = np.abs(x)
        if mode == "precise":
            bound = np.quantile(values, 0.95)
        else:
            bound = np.quantile(values.reshape(len(x), -1), 0.95, axis=1).mean()
        x = np.clip(x, -bound, bound)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def neighbours(x: np.ndarray) -> list[set[int]]:
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return [set(np.argsort(-r, kind="stable")[:k].tolist()) for r in sims]

    v, lang = prepared(vision), prepared(language)
    return max(
        np.mean([len(p & q) / k for p, q in zip(neighbours(v[:, i]), neighbours(lang[:, j]))])
        for i in range(v.shape[1])
        for j in range(lang.shape[1])
    )


def test_score_layers_clamp_modes_match_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    shared = torch.randn(64, 6, generator=gen)
    vision = torch.stack([shared @ torch.randn(6, 16, generator=gen) + (i + 1) * torch.randn(64, 16, generator=gen)
                          for i in range(3)], dim=1)  # fmt: skip
    language = torch.stack([shared @ torch.randn(6, 24, generator=gen) + 2 * torch.randn(64, 24, generator=gen)
                            for _ in range(4)], dim=1)  # fmt: skip
    language[:, :, 3] += 200 * torch.rand(64, 4, generator=gen)  # per-sample massive activation
    language[:32] *= 3
    scores = {}
    for mode in ("precise", "per_sample_mean"):
        scores[mode] = al.score_layers(vision, language, "mutual_knn", 5, outlier_clamp=mode).score
        expected = _reference_best_mutual_knn(vision.numpy(), language.numpy(), mode, 5)
        assert scores[mode] == pytest.approx(expected, abs=1e-6), mode
    assert abs(scores["precise"] - scores["per_sample_mean"]) > 0.01  # the data tells the modes apart


def test_config_fails_fast(world: Path) -> None:
    base = {"data": str(world), "vision": ["v"], "language": ["l"], "output_dir": "out"}
    with pytest.raises(ValueError, match="--k must be in"):
        al.AlignmentConfig(**base, k=32, num_samples=32)
    with pytest.raises(ValueError, match=r"--k must be in \[2"):
        al.AlignmentConfig(**base, k=1, metrics=["cknna"])
    with pytest.raises(ValueError, match="unknown metric"):
        al.AlignmentConfig(**base, metrics=["svcca"])
    with pytest.raises(ValueError, match="unique"):
        al.AlignmentConfig(**{**base, "vision": ["a=x", "a=y"]})
    with pytest.raises(ValueError, match="--outlier_clamp must be one of"):
        al.AlignmentConfig(**base, outlier_clamp="exact")


@pytest.mark.slow
def test_minilm_self_alignment_on_captions(minilm: al.LanguageModel, world: Path) -> None:
    """Real MiniLM features of the generated captions aligned with themselves: every layer matches itself."""
    feats = al.language_features(minilm, al.PrhDataset(world).texts, batch_size=8)
    for metric in ("mutual_knn", "cka", "unbiased_cka", "cknna"):
        result = al.score_layers(feats, feats, metric, k=5)
        matrix = torch.tensor(result.matrix)
        assert matrix.shape == (7, 7)
        # CKA-type scores carry platonic-rep's +1e-6 in the denominator; these captions are so alike
        # that HSIC is ~1e-3, hence the looser tolerance. Mutual k-NN has no such term.
        tol = 1e-6 if metric == "mutual_knn" else 3e-3
        assert torch.allclose(matrix.diagonal(), torch.ones(7), atol=tol), metric
        # Unbiased HSIC estimates are not bounded by 1, so off-diagonal CKA-type scores may exceed it.
        assert (
            result.score == pytest.approx(1.0, abs=tol) if metric == "mutual_knn" else result.score >= 1 - tol
        )
        if metric != "cknna":  # platonic-rep's CKNNA is not symmetric: 1ᵀK̃L̃1 with non-symmetric masks
            # float64 kernels and HSIC: symmetric to rounding on every BLAS (float32 gave ~2e-4 on one).
            assert torch.allclose(matrix, matrix.T, rtol=0, atol=1e-12), metric


@pytest.mark.slow
def test_cli_end_to_end(world: Path, siglip_dir: Path, export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "alignment"
    al.main(["--data", str(world / "prh"), "--vision", f"tiny={siglip_dir}", str(export_dir),
             "--language", "minilm", "--metrics", "mutual_knn", "cknna", "--k", "4", "--num_samples", "24",
             "--seeds", "0", "1", "--batch_size", "8", "--device", "cpu", "--output_dir", str(out)])  # fmt: skip
    results = json.loads((out / "alignment.json").read_text())
    assert results["kind"] == "alignment"
    assert len(results["rows"]) == 2 * 2 * 2  # seeds x metrics x vision models
    export_name = export_dir.name
    for row in results["rows"]:
        assert {
            "run",
            "vision",
            "language",
            "metric",
            "k",
            "score",
            "vision_layer",
            "language_layer",
            "matrix",
        } <= set(row)
        matrix = np.array(row["matrix"])
        assert matrix.shape == (3, 7)  # tiny SigLIP: embeddings + 2 layers; MiniLM: embeddings + 6 layers
        assert row["score"] == matrix.max() == matrix[row["vision_layer"], row["language_layer"]]
        assert row["language"] == "minilm" and row["vision"] in {"tiny", export_name}
        assert (row.get("loss_type") == "dpo") == (row["vision"] == export_name)
    # The export wraps the same tower, so both vision entries must agree exactly.
    by_key = {(r["vision"], r["metric"], r["seed"]): r["matrix"] for r in results["rows"]}
    assert all(
        by_key[("tiny", m, s)] == by_key[(export_name, m, s)] for m in ("mutual_knn", "cknna") for s in (0, 1)
    )
    # Independent recomputation of one entry: numpy preprocessing + set-based mutual k-NN.
    row = next(
        r for r in results["rows"] if r["metric"] == "mutual_knn" and r["seed"] == 1 and r["vision"] == "tiny"
    )
    data = al.PrhDataset(world)
    subset = al.sample_indices(len(data), 24, seed=1)
    vision = al.vision_features(al.load_vision_encoder(siglip_dir), data.images(subset)).numpy()
    language = al.language_features(
        al.load_language_model(al.minilm_path()), [data.texts[i] for i in subset]
    ).numpy()

    def prepared(x: np.ndarray) -> np.ndarray:
        bound = np.quantile(np.abs(x), 0.95)
        x = np.clip(x, -bound, bound)
        return x / np.linalg.norm(x, axis=-1, keepdims=True)

    def neighbours(x: np.ndarray) -> list[set[int]]:
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return [set(np.argsort(-r)[:4].tolist()) for r in sims]

    v, lang = prepared(vision)[:, 2], prepared(language)[:, 5]
    expected = np.mean([len(p & q) / 4 for p, q in zip(neighbours(v), neighbours(lang))])
    assert row["matrix"][2][5] == pytest.approx(expected, abs=1e-6)
    summary = {(s["vision"], s["metric"]): s for s in results["summary"]}
    scores = [r["score"] for r in results["rows"] if r["vision"] == "tiny" and r["metric"] == "mutual_knn"]
    assert summary[("tiny", "mutual_knn")]["mean"] == pytest.approx(np.mean(scores))
    assert summary[("tiny", "mutual_knn")]["std"] == pytest.approx(np.std(scores, ddof=1))
    table = (out / "alignment.md").read_text()
    assert "### mutual_knn (k=4)" in table and "| tiny |" in table
    assert (out / "alignment.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_whole_dataset_runs_one_seed_and_says_n_1(world: Path, siglip_dir: Path, tmp_path: Path) -> None:
    """--num_samples = dataset size with three seeds: one seed scored, no ± std in alignment.md."""
    out = tmp_path / "alignment"
    results = al.main(["--data", str(world), "--vision", f"tiny={siglip_dir}", "--language", "minilm",
                       "--k", "4", "--num_samples", "32", "--seeds", "5", "1", "2", "--outlier_clamp", "per_sample_mean",
                       "--device", "cpu", "--output_dir", str(out)])  # fmt: skip
    assert [row["seed"] for row in results["rows"]] == [5]
    assert results["config"]["seeds"] == [5] and results["config"]["outlier_clamp"] == "per_sample_mean"
    assert results["rows"][0]["outlier_clamp"] == "per_sample_mean"
    table = (out / "alignment.md").read_text()
    assert "±" not in table and "(n=1)" in table
