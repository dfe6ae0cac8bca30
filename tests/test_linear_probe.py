"""Linear probe: scikit-learn reference on real digits, torch L-BFGS equivalence, prototype, C sweep, CLI."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

from analysis.features import FeatureOptions, read_encoder_spec
from analysis.linear_probe import (
    LinearModel,
    LinearProbeConfig,
    fit_logreg,
    fit_prototype,
    fit_torch_lbfgs,
    main,
    options_for,
    random_subset,
    run_linear_probe,
    sweep_c,
    topk_accuracy,
)

INPUT_SIZE = 16  # the tiny encoders' input resolution


@pytest.fixture(scope="module", autouse=True)
def single_threaded() -> Iterator[None]:
    """Problems this small run fastest on one thread; BLAS thread pools crawl on a loaded 2-core machine."""
    import torch
    from threadpoolctl import threadpool_limits

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, ...]:
    """scikit-learn's handwritten digits resized to the encoder input; raw pixels in [0, 1] as features."""
    data = load_digits()
    images = (data.images * (255 / 16)).round().astype(np.uint8)
    resized = np.stack(
        [np.asarray(Image.fromarray(i).resize((INPUT_SIZE, INPUT_SIZE), Image.BILINEAR)) for i in images]
    )
    pixels = resized.reshape(len(images), -1) / 255.0
    return tuple(train_test_split(pixels, data.target, test_size=0.3, stratify=data.target, random_state=0))


def sklearn_objective(model: LinearModel, x: np.ndarray, y: np.ndarray, c: float) -> float:
    """C·ΣCE + ½‖W‖², written out independently of both solvers."""
    scores = model.scores(x)
    scores = scores - scores.max(axis=1, keepdims=True)
    log_probs = scores - np.log(np.exp(scores).sum(axis=1, keepdims=True))
    index = np.searchsorted(model.classes, y)
    ce = -log_probs[np.arange(len(y)), index].sum()
    return c * ce + 0.5 * float((model.coef**2).sum())


def test_logreg_probe_on_digits_reaches_sklearn_reference(digits: tuple[np.ndarray, ...]) -> None:
    train_x, eval_x, train_y, eval_y = digits
    reference = LogisticRegression(max_iter=1000).fit(train_x, train_y).score(eval_x, eval_y)
    config = LinearProbeConfig(methods=("logreg",), c_grid=(0.1, 10.0), refine_steps=1)
    (row,) = run_linear_probe(train_x, train_y, eval_x, eval_y, config)
    assert reference > 0.95
    assert row["top1"] > 0.95 and row["top1"] >= reference - 0.01
    assert row["top5"] >= row["top1"]
    assert row["C"] in {h["C"] for h in row["sweep"]} and len(row["sweep"]) == 4  # 2 coarse + 2 refined
    assert row["n_train"] == len(train_x) and row["n_eval"] == len(eval_x) and row["n_classes"] == 10


@pytest.mark.parametrize("c", [0.05, 1.0])
def test_torch_lbfgs_matches_sklearn_at_the_same_c(digits: tuple[np.ndarray, ...], c: float) -> None:
    train_x, eval_x, train_y, eval_y = digits
    reference = fit_logreg(train_x, train_y, c)
    torch_model = fit_torch_lbfgs(train_x, train_y, c, device="cpu")
    accuracy_gap = abs(
        topk_accuracy(reference, eval_x, eval_y, 1) - topk_accuracy(torch_model, eval_x, eval_y, 1)
    )
    assert accuracy_gap <= 0.005
    # same objective reached: a wrong C conversion (e.g. forgetting N) moves it by orders of magnitude
    reference_objective = sklearn_objective(reference, train_x, train_y, c)
    assert sklearn_objective(torch_model, train_x, train_y, c) == pytest.approx(reference_objective, rel=2e-3)


def test_torch_lbfgs_binary_uses_sklearn_parameterisation(digits: tuple[np.ndarray, ...]) -> None:
    train_x, _, train_y, _ = digits
    keep = np.isin(train_y, [3, 8])
    reference = fit_logreg(train_x[keep], train_y[keep], 0.5)
    torch_model = fit_torch_lbfgs(train_x[keep], train_y[keep], 0.5, device="cpu")
    assert torch_model.coef.shape == reference.coef.shape == (1, train_x.shape[1])
    np.testing.assert_allclose(torch_model.coef, reference.coef, atol=5e-3)
    objective = sklearn_objective(reference, train_x[keep], train_y[keep], 0.5)
    assert sklearn_objective(torch_model, train_x[keep], train_y[keep], 0.5) == pytest.approx(
        objective, rel=1e-3
    )


def test_prototype_classifier_is_nearest_class_mean_by_cosine(digits: tuple[np.ndarray, ...]) -> None:
    train_x, eval_x, train_y, eval_y = digits
    model = fit_prototype(train_x, train_y)
    unit = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    means = np.stack([unit[train_y == k].mean(0) for k in range(10)])
    eval_unit = eval_x / np.linalg.norm(eval_x, axis=1, keepdims=True)
    cosine = eval_unit @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    expected = (cosine.argmax(1) == eval_y).mean()
    assert topk_accuracy(model, eval_x, eval_y, 1) == pytest.approx(expected)
    assert expected > 0.85  # class means of real digits are informative
    (row,) = run_linear_probe(train_x, train_y, eval_x, eval_y, LinearProbeConfig(methods=("prototype",)))
    assert row["C"] is None and row["top1"] == pytest.approx(expected)


def test_sweep_picks_the_best_c_and_refines_around_it() -> None:
    """A fake fit whose validation accuracy peaks at C = 10**0.3 (accuracy 1 - |log10 C - 0.3| / 4)."""
    val_x, val_y = np.eye(20), np.arange(20) % 2
    called: list[float] = []

    def fit(x: np.ndarray, y: np.ndarray, c: float) -> LinearModel:
        called.append(c)
        correct = round(20 * max(0.0, 1 - abs(np.log10(c) - 0.3) / 4))
        coef = np.zeros((2, 20))
        for i in range(20):  # sample i scores its own class highest iff i < correct
            coef[val_y[i] if i < correct else 1 - val_y[i], i] = 1.0
        return LinearModel(coef[1:] - coef[:1], np.zeros(1), np.array([0, 1]))

    best, history = sweep_c(fit, val_x, val_y, val_x, val_y, grid=(0.01, 1.0, 100.0), refine_steps=3)
    assert called[:3] == [0.01, 1.0, 100.0]
    assert called[3:5] == pytest.approx([10**-1, 10**1])  # ±1 decade around 1.0
    assert abs(np.log10(best) - 0.3) <= 0.25 + 1e-9
    assert [h["C"] for h in history] == sorted(h["C"] for h in history)


def test_random_subset_is_seeded_and_unique() -> None:
    a, b = random_subset(1000, 50, seed=3), random_subset(1000, 50, seed=3)
    np.testing.assert_array_equal(a, b)
    assert len(np.unique(a)) == 50 and not np.array_equal(a, random_subset(1000, 50, seed=4))
    with pytest.raises(ValueError):
        random_subset(10, 11, seed=0)


def _tiny_siglip(path: Path) -> Path:
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=INPUT_SIZE,
        patch_size=4,
    )
    transformers.SiglipVisionModel(config).save_pretrained(path)
    transformers.SiglipImageProcessorPil(size={"height": INPUT_SIZE, "width": INPUT_SIZE}).save_pretrained(
        path
    )
    return path


@pytest.mark.slow
def test_cli_writes_contract_results_for_several_encoders(tmp_path: Path) -> None:
    data = load_digits()
    rng = np.random.default_rng(0)
    for split, count in (("train", 60), ("val", 30)):
        for i in rng.choice(len(data.images), size=count, replace=False):
            folder = tmp_path / "digits" / split / str(data.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray((data.images[i] * 15).astype(np.uint8)).save(folder / f"{i}.png")
    encoders = [_tiny_siglip(tmp_path / "sft"), _tiny_siglip(tmp_path / "dpo")]
    out = tmp_path / "lp.json"
    main(["--encoders", *map(str, encoders), "--train-data", str(tmp_path / "digits"), "--train-split", "train",
          "--eval-data", str(tmp_path / "digits"), "--eval-split", "val", "--feature-points", "encoder",
          "--methods", "logreg", "torch_lbfgs", "prototype", "--c-grid", "0.1", "10", "--refine-steps", "0",
          "--train-subset", "50", "--out", str(out), "--table", str(tmp_path / "lp.md"),
          "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"])  # fmt: skip
    results = json.loads(out.read_text())
    assert results["kind"] == "linear_probe" and results["settings"]["train_subset"] == 50
    rows = results["rows"]
    assert [(r["run"], r["method"]) for r in rows] == [
        (run, method) for run in ("sft", "dpo") for method in ("logreg", "torch_lbfgs", "prototype")
    ]
    for row in rows:
        assert row["feature_point"] == "encoder" and row["pooling"] == "mean" and row["n_train"] == 50
        assert 0.0 <= row["top1"] <= row["top5"] <= 1.0
        assert (row["C"] is None) == (row["method"] == "prototype")
    assert rows[0]["top1"] == pytest.approx(rows[3]["top1"])  # same weights (seed 0) → same result
    assert "torch_lbfgs" in (tmp_path / "lp.md").read_text()


def test_encoders_without_a_projector_are_probed_at_their_other_points(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A tower-only "original" export or a plain HF dir has no projector/: one run mixes it with trained
    exports, so it loses the projector rows (with a warning) instead of failing the whole command."""
    plain = read_encoder_spec(_tiny_siglip(tmp_path / "original"))
    both = FeatureOptions(feature_points=("encoder", "projector"))
    with caplog.at_level(logging.WARNING):
        assert options_for(plain, both).feature_points == ("encoder",)
    assert "no projector/" in caplog.text
    exported = replace(plain, projector_dir=tmp_path / "projector")
    assert options_for(exported, both) is both
    with pytest.raises(ValueError, match="projector only"):
        options_for(plain, FeatureOptions(feature_points=("projector",)))
