"""Grad-CAM of the vision-token gradients (analysis.gradcam, analysis.gradcam_metrics) on tiny models.

References are independent of the code under test: hand-computed coverages and extents, scipy's
entropy, brute-force supersampling, a hand-written SFT/DPO loss over the vision tokens checked by
autograd and finite differences, and HF's own token packing (attention masks that leave a single
visual token visible).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import entropy as scipy_entropy

from analysis import gradcam as gc
from analysis import gradcam_metrics as gm
from analysis import gradcam_outputs
from llava.data.records import PreferenceRecord
from llava.train.losses import LossConfig

GRID = 4  # tiny SigLIP: 32 px images, 8 px patches


# ---- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def square_checkpoint(tiny_dir, tmp_path_factory) -> Path:
    from llava.model.builder import ModelConfig, build_model, save_model

    out = tmp_path_factory.mktemp("gradcam_ckpt")
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "siglip"))
    )
    save_model(model, tokenizer, processor, out)
    return out


@pytest.fixture(scope="module")
def square(square_checkpoint):
    from llava.model.builder import load_model

    return load_model(square_checkpoint)


@pytest.fixture(scope="module")
def anyres(tiny_dir):
    from llava.model.builder import ModelConfig, build_model

    return build_model(
        ModelConfig(
            llm=str(tiny_dir / "llm"),
            vision_tower=str(tiny_dir / "siglip"),
            image_aspect_ratio="anyres_max_9",
        )
    )


@pytest.fixture(scope="module")
def world(tiny_dir, tmp_path_factory) -> tuple[Path, Path]:
    """(world root, DPO json) from the synthetic world and the real MMPR converter."""
    from llava.data.mmpr import MMPRConfig, convert_mmpr, write_conversion
    from llava.data.synthetic import generate_world

    root = tmp_path_factory.mktemp("gradcam_world")
    generate_world(root / "world", seed=0, num_train=6, num_val=1, image_size=32)
    conversion = convert_mmpr(
        MMPRConfig(
            meta_path=str(root / "world" / "mmpr" / "meta.json"),
            size=4,
            tokenizer=str(tiny_dir / "llm"),
            image_folder=str(root / "world"),
        )
    )
    paths = write_conversion(conversion, root / "dpo.json", root / "sft.json")
    return root / "world", Path(paths["dpo"])


def _record(tmp_path: Path, size: tuple[int, int], box: list[int] | None = None) -> PreferenceRecord:
    """A preference record on a random RGB image of PIL size (width, height)."""
    rng = np.random.default_rng(0)
    path = tmp_path / f"image_{size[0]}x{size[1]}.png"
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    meta = {} if box is None else {"box": box}
    return PreferenceRecord(
        "s/1",
        [str(path)],
        "<image>\nWhat is in the image?",
        "A red circle.",
        "A blue square.",
        meta,
        "test.json",
    )


def _batch(components, record: PreferenceRecord) -> dict:
    model, tokenizer, processor = components
    return gc.prepare_batch(record, tokenizer, processor, model.config, "qwen_1_5", 512)


def _keep_one_visual_token(batch: dict, image_token_id: int, keep: int) -> dict:
    """Attention masks that hide every visual token but the `keep`-th (in packed order)."""
    out = dict(batch)
    for prefix in ("", "rejected_"):
        positions = (batch[f"{prefix}input_ids"][0] == image_token_id).nonzero()[:, 0]
        mask = batch[f"{prefix}attention_mask"].clone()
        mask[0, positions] = 0
        mask[0, positions[keep]] = 1
        out[f"{prefix}attention_mask"] = mask
    return out


# ---- metrics: hand-computed references -------------------------------------------------------------


def test_box_coverage_hand_computed():
    cov = gm.box_coverage([8, 8, 16, 24], (GRID, GRID), (0, 0, 32, 32))
    expected = np.zeros((GRID, GRID))
    expected[1:3, 1] = 1.0
    np.testing.assert_allclose(cov, expected)
    half = gm.box_coverage([4, 0, 8, 8], (GRID, GRID), (0, 0, 32, 32))
    assert half[0, 0] == pytest.approx(0.5) and half.sum() == pytest.approx(0.5)
    # The grid covers only x in [8, 24): a box at x in [0, 8) misses it, one at [8, 12) fills half a column.
    cropped = gm.box_coverage([0, 0, 8, 32], (GRID, GRID), (8, 0, 24, 32))
    assert cropped.sum() == 0
    column = gm.box_coverage([8, 0, 10, 32], (GRID, GRID), (8, 0, 24, 32))
    np.testing.assert_allclose(column[:, 0], 0.5)
    assert column[:, 1:].sum() == 0


def test_mask_coverage_hand_computed_and_matches_box():
    mask = np.zeros((32, 32))
    mask[3, 5] = 1  # one pixel in cell (0, 0) of 8x8 pixels
    cov = gm.mask_coverage(mask, (GRID, GRID), (0, 0, 32, 32))
    assert cov[0, 0] == pytest.approx(1 / 64) and cov.sum() == pytest.approx(1 / 64)
    box = [3, 5, 27, 13]
    box_mask = np.zeros((20, 30))
    box_mask[5:13, 3:27] = 1
    extent = (2.5, 1.0, 29.0, 19.5)
    np.testing.assert_allclose(
        gm.mask_coverage(box_mask, (3, 5), extent), gm.box_coverage(box, (3, 5), extent), atol=1e-12
    )


def test_mass_and_entropy():
    grid = np.array([[1.0, 3.0], [0.0, 4.0]])
    coverage = np.array([[1.0, 0.5], [1.0, 0.0]])
    assert gm.mass_in_region(grid, coverage) == pytest.approx((1 + 1.5) / 8)
    rng = np.random.default_rng(1)
    values = rng.random((5, 7))
    assert gm.normalised_entropy(values) == pytest.approx(scipy_entropy(values.ravel()) / math.log(35))
    assert gm.normalised_entropy(np.ones((3, 3))) == pytest.approx(1.0)
    one_hot = np.zeros((3, 3))
    one_hot[1, 2] = 5.0
    assert gm.normalised_entropy(one_hot) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="zero total mass"):
        gm.normalised_entropy(np.zeros((2, 2)))
    with pytest.raises(ValueError, match="inside"):
        gm.check_box([0, 0, 40, 10], 32, 32)


def test_redistribute_matches_supersampling():
    rng = np.random.default_rng(2)
    src = rng.random((2, 4))
    fine = np.kron(src, np.ones((3, 3))) / 9  # 6x12 cells of equal mass share
    expected = fine.reshape(3, 2, 4, 3).sum(axis=(1, 3))  # 3x4 destination cells
    np.testing.assert_allclose(gm.redistribute(src, (3, 4)), expected)
    assert gm.redistribute(src, (5, 7)).sum() == pytest.approx(src.sum())
    # Source over x, y in [0, 4) x [0, 2); destination cells of 1 px over [0, 4) x [-1, 3): rows shift by 1.
    shifted = gm.redistribute(src, (4, 4), (0, 0, 4, 2), (0, -1, 4, 3))
    np.testing.assert_allclose(shifted[1:3], src)
    assert shifted[0].sum() == 0 and shifted[3].sum() == 0


def test_map_extent_follows_the_processor(tiny_dir, square, anyres):
    import transformers

    siglip = transformers.AutoImageProcessor.from_pretrained(tiny_dir / "siglip")
    clip = transformers.AutoImageProcessor.from_pretrained(tiny_dir / "clip")
    config = square[0].config
    assert gm.map_extent(siglip, config, 24, 40) == (0, 0, 40, 24)
    # CLIP: shortest edge 24 -> 32 (scale 4/3), centre crop 32x32 = the centred 24x24 of the original.
    assert gm.map_extent(clip, config, 24, 40) == pytest.approx((8, 0, 32, 24))
    convnext = transformers.ConvNextImageProcessor(size={"shortest_edge": 224}, crop_pct=0.875)
    side = 0.875 * 300
    assert gm.map_extent(convnext, config, 300, 400) == pytest.approx(
        ((400 - side) / 2, (300 - side) / 2, (400 + side) / 2, (300 + side) / 2)
    )
    # anyres, 32 px tiles of 4x4 tokens, image 40x96 (h x w): tiling 2x3 on a 64x96 canvas, the image
    # pasted unscaled at y = 12; HF's unpad keeps token rows 1..7 = canvas y 8..56 = image y -4..44.
    model, _, processor = anyres
    assert gm.map_extent(processor, model.config, 40, 96) == pytest.approx((0, -4, 96, 44))
    assert gm.map_extent(processor, model.config, 32, 32) == pytest.approx((0, 0, 32, 32))


# ---- gradients: autograd and finite-difference references -------------------------------------------


def _reference_loss(model, batch: dict, loss_type: str, beta: float, ref: tuple[torch.Tensor, torch.Tensor]):
    """Vision tokens A (detached) and a hand-written loss(A) that never touches llava.train or analysis."""
    pixels = batch["pixel_values"].to(model.dtype)
    tokens = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[-1].detach()
    image_id = model.config.image_token_id

    def logp(visual: torch.Tensor, prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        ids, labels = batch[f"{prefix}input_ids"], batch[f"{prefix}labels"]
        embeds = model.get_input_embeddings()(ids).clone()
        embeds[ids == image_id] = visual
        hidden = model.model.language_model(
            inputs_embeds=embeds, attention_mask=batch[f"{prefix}attention_mask"]
        ).last_hidden_state
        logprobs = torch.log_softmax(model.lm_head(hidden[:, :-1]), dim=-1)
        targets = labels[:, 1:]
        valid = targets != -100
        picked = logprobs.gather(-1, targets.clamp(min=0)[..., None])[..., 0]
        return (picked * valid).sum(), valid.sum()

    def loss(a: torch.Tensor) -> torch.Tensor:
        visual = model.model.multi_modal_projector(a).reshape(-1, model.config.text_config.hidden_size)
        chosen, n_chosen = logp(visual, "")
        if loss_type == "sft":
            return -chosen / n_chosen
        rejected, _ = logp(visual, "rejected_")
        return -F.logsigmoid(beta * ((chosen - rejected) - (ref[0].sum() - ref[1].sum())))

    return tokens, loss


def _rms_norm_float64(self, hidden: torch.Tensor) -> torch.Tensor:
    """Qwen2RMSNorm without its float32 round trip, so finite differences in float64 are exact enough."""
    variance = hidden.pow(2).mean(-1, keepdim=True)
    return self.weight * (hidden * torch.rsqrt(variance + self.variance_epsilon))


@pytest.mark.parametrize("loss_type", ["sft", "dpo"])
def test_gradient_map_equals_autograd_and_finite_differences(square, tmp_path, monkeypatch, loss_type):
    from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

    monkeypatch.setattr(Qwen2RMSNorm, "forward", _rms_norm_float64)
    model, tokenizer, processor = square
    model64 = model.to(torch.float64)
    try:
        batch = _batch(square, _record(tmp_path, (32, 32)))
        ref = (torch.tensor([-30.0], dtype=torch.float64), torch.tensor([-28.0], dtype=torch.float64))
        _, grad = gc.vision_token_gradient(model64, batch, loss_type, LossConfig(beta=0.1), ref)
        ours = gm.token_grid(grad, model64.config, (32, 32))

        tokens, loss_fn = _reference_loss(model64, batch, loss_type, 0.1, ref)
        a = tokens.clone().requires_grad_(True)
        (expected,) = torch.autograd.grad(loss_fn(a), a)
        # llava.train.logps computes the log-softmax in float32, hence rtol 1e-5 rather than float64's.
        np.testing.assert_allclose(ours, expected[0].norm(dim=-1).reshape(GRID, GRID).numpy(), rtol=1e-5)
        for token, channel in [(0, 0), (5, 7), (15, 31)]:
            eps = 1e-4
            plus, minus = tokens.clone(), tokens.clone()
            plus[0, token, channel] += eps
            minus[0, token, channel] -= eps
            with torch.no_grad():
                numeric = (loss_fn(plus) - loss_fn(minus)) / (2 * eps)
            assert float(numeric) == pytest.approx(float(expected[0, token, channel]), rel=1e-5, abs=1e-9)
    finally:
        model.to(torch.float32)


def test_single_visible_patch_takes_the_mass(square, tmp_path):
    model, _, _ = square
    target = 6  # row 1, column 2 of the 4x4 grid
    record = _record(tmp_path, (32, 32), box=[16, 8, 24, 16])
    batch = _keep_one_visual_token(_batch(square, record), model.config.image_token_id, target)
    ref = (torch.tensor([-30.0]), torch.tensor([-28.0]))
    for loss_type in ("sft", "dpo"):
        _, grad = gc.vision_token_gradient(model, batch, loss_type, LossConfig(), ref)
        grid = gm.token_grid(grad, model.config, (32, 32))
        assert grid[1, 2] / grid.sum() > 0.9
        coverage = gradcam_outputs.region_coverage(
            record, Image.open(record.images[0]), grid.shape, (0, 0, 32, 32), None
        )
        assert gm.mass_in_region(grid, coverage) > 0.9
        assert gm.normalised_entropy(grid) < 0.1


def test_anyres_tiles_map_back_onto_the_image(anyres, tmp_path):
    """16x64 image, 32 px tiles: a 1x2 tiling, mosaic 4x8 unpadded to 2x8; packed = 16 base + 2 rows of 8+1."""
    model, _, _ = anyres
    batch = _batch(anyres, _record(tmp_path, (64, 16)))
    image_id = model.config.image_token_id
    assert int((batch["input_ids"] == image_id).sum()) == 16 + 2 * 9
    ref = (torch.tensor([-30.0]), torch.tensor([-28.0]))
    tile_cell = _keep_one_visual_token(batch, image_id, 16 + 1 * 9 + 5)  # unpadded mosaic cell (1, 5)
    _, grad = gc.vision_token_gradient(model, tile_cell, "sft", LossConfig(), ref)
    grid = gm.token_grid(grad, model.config, (16, 64))
    assert grid.shape == (2, 8)
    assert grid[1, 5] / grid.sum() > 0.9
    base_cell = _keep_one_visual_token(
        batch, image_id, 1 * GRID + 3
    )  # base cell (1, 3): image rows 4-8, cols 48-64
    _, grad = gc.vision_token_gradient(model, base_cell, "dpo", LossConfig(), ref)
    grid = gm.token_grid(grad, model.config, (16, 64))
    assert (grid[0, 6] + grid[0, 7]) / grid.sum() > 0.9
    assert grid[0, 6] == pytest.approx(grid[0, 7])


# ---- the paper's protocol ----------------------------------------------------------------------------


@pytest.mark.slow
def test_protocol_schedule_and_weight_restore(square, tmp_path):
    model, _, _ = square
    batch = _batch(square, _record(tmp_path, (32, 32)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ref = gc.policy_reference_logps(model, batch)
    analysis = gc.GradcamConfig(loss_types=("dpo",), steps=(0,))
    plain = gc.sample_maps(model, batch, analysis, ref, (32, 32))["dpo"][0]
    cfg = gc.GradcamConfig(
        loss_types=("sft", "dpo"), steps=(0, 1, 3), learning_rates={"sft": 1e-2, "dpo": 1e-2}
    )
    maps = gc.sample_maps(model, batch, cfg, ref, (32, 32), gc.InitialWeights(model))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), f"{key} not restored"
    step0, step1, step3 = maps["dpo"]
    np.testing.assert_allclose(step0.grid, plain.grid, rtol=1e-5)
    assert step0.loss == pytest.approx(math.log(2), rel=1e-5)  # the starting model is the reference
    # warmup = ceil(0.03 * 3) = 1 step: the first update has LR 0, so step 1 sees the starting weights.
    assert [m.learning_rate for m in maps["dpo"]] == pytest.approx(
        [0.0, 1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi * 2 / 2))]
    )
    np.testing.assert_allclose(step1.grid, step0.grid, rtol=1e-5)
    assert not np.allclose(step3.grid, step0.grid, rtol=1e-3)
    assert maps["sft"][2].loss < maps["sft"][0].loss


def test_config_fails_fast():
    with pytest.raises(ValueError, match="loss_types"):
        gc.GradcamConfig(loss_types=("ppo",))
    with pytest.raises(ValueError, match="train_steps"):
        gc.GradcamConfig(steps=(0, 20), train_steps=10)
    with pytest.raises(ValueError, match="learning_rates"):
        gc.GradcamConfig(learning_rates={"sft": -1.0})


def test_multi_image_record_is_refused(square, tmp_path):
    record = _record(tmp_path, (32, 32))
    two = PreferenceRecord("s/2", record.images * 2, "<image><image>\nQ?", "a", "b", {}, "test.json")
    with pytest.raises(ValueError, match="exactly one image"):
        _batch(square, two)


# ---- CLI, results file, figures, summary -------------------------------------------------------------


@pytest.mark.slow
def test_cli_writes_results_maps_and_figures(square_checkpoint, world, tmp_path):
    root, dpo_json = world
    records = json.loads(dpo_json.read_text())
    out = tmp_path / "out"
    gc.main(
        [
            "--checkpoint", str(square_checkpoint),
            "--data_path", str(dpo_json),
            "--image_folder", str(root),
            "--num_samples", "2",
            "--steps", "0", "2",
            "--learning_rates", "sft=1e-3", "dpo=1e-3",
            "--out_dir", str(out),
        ]
    )  # fmt: skip
    doc = json.loads((out / "gradcam.json").read_text())
    assert doc["kind"] == "gradcam" and doc["run"] == square_checkpoint.name
    assert len(doc["rows"]) == 2 * 2 * 2
    assert {(r["id"], r["loss_type"], r["step"]) for r in doc["rows"]} == {
        (rec["id"], loss, step) for rec in records[:2] for loss in ("sft", "dpo") for step in (0, 2)
    }
    for row in doc["rows"]:
        grid = np.load(out / row["map_npy"])
        assert grid.shape == (GRID, GRID) and row["grid"] == [GRID, GRID]
        assert 0.0 <= row["mass_in_box"] <= 1.0 and 0.0 <= row["entropy"] <= 1.0
        assert row["entropy"] == pytest.approx(scipy_entropy(grid.ravel()) / math.log(grid.size))
        assert (out / row["image"]).is_file()
        name = Path(row["map_npy"]).stem
        assert (out / "overlays" / f"{name}.png").is_file()
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert len(figures) == 2 * 2 and all(Image.open(out / "figures" / f).size[0] > 100 for f in figures)

    summary = gm.main([str(out / "gradcam.json"), "--out_dir", str(tmp_path / "summary")])
    sft0 = next(r for r in summary if r["loss_type"] == "sft" and r["step"] == 0)
    masses = [r["mass_in_box"] for r in doc["rows"] if r["loss_type"] == "sft" and r["step"] == 0]
    assert sft0["mass_in_box_mean"] == pytest.approx(np.mean(masses)) and sft0["samples"] == 2
    assert (tmp_path / "summary" / "summary.csv").is_file()


@pytest.mark.slow
def test_single_step_results_load_in_the_report(square_checkpoint, world, tmp_path):
    from analysis.report import collect_results, load_gradcam_samples

    root, dpo_json = world
    first = json.loads(dpo_json.read_text())[0]["id"]
    out = tmp_path / "one"
    path = gc.run_gradcam(
        str(square_checkpoint),
        str(dpo_json),
        out,
        gc.GradcamConfig(steps=(0,)),
        image_folder=str(root),
        ids=[first],
    )
    assert sorted(p.name for p in (out / "maps").iterdir()) == sorted(
        f"{gradcam_outputs.safe_name(first)}_{loss}.npy" for loss in ("sft", "dpo")
    )
    grouped, _ = collect_results(out)
    samples = load_gradcam_samples(grouped["gradcam"])
    run = grouped["gradcam"][0].rows[0]["run"]  # the run label, a top-level default of the rows
    assert [s.id for s in samples] == [f"{run}: {first}"] and set(samples[0].maps) == {"sft", "dpo"}
    assert samples[0].image is not None
    with pytest.raises(ValueError, match="no records with ids"):
        gc.run_gradcam(str(square_checkpoint), str(dpo_json), out, gc.GradcamConfig(steps=(0,)), ids=["nope"])
    assert path.name == "gradcam.json"
