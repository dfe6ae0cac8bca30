"""Alignment metrics (analysis.alignment_metrics) against hand-computed values and independent references."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from analysis.alignment_metrics import (
    MATRIX_METRICS,
    PAIR_METRICS,
    alignment_matrix,
    cka,
    cknna,
    hsic_unbiased,
    knn_indices,
    mutual_knn,
    mutual_knn_matrix,
    per_sample_quantile_abs,
    prepare_features,
    quantile_abs,
    unbiased_cka,
)


def _unit_vectors(degrees: list[float], dim: int = 2) -> torch.Tensor:
    rad = torch.tensor(degrees, dtype=torch.float64) * math.pi / 180
    out = torch.zeros(len(degrees), dim, dtype=torch.float64)
    out[:, 0], out[:, 1] = torch.cos(rad), torch.sin(rad)
    return out.float()


# Hand-built: A has two clusters {0,1,2} at 0/10/20° and {3,4,5} at 90/100/110°.
# B puts the points at 0, 90, 15, 100, 5, 180°. With k = 2 (inner product = cosine of the angle):
#   kNN_A: 0:{1,2} 1:{0,2} 2:{0,1} 3:{4,5} 4:{3,5} 5:{3,4}
#   kNN_B: 0:{4,2} 1:{3,2} 2:{4,0} 3:{1,5} 4:{0,2} 5:{3,1}
#   overlaps: 1, 1, 1, 1, 0, 1 -> 5 / (6 * 2)
HAND_A = _unit_vectors([0, 10, 20, 90, 100, 110])
HAND_B = _unit_vectors([0, 90, 15, 100, 5, 180], dim=3)
HAND_KNN_A = [{1, 2}, {0, 2}, {0, 1}, {4, 5}, {3, 5}, {3, 4}]
HAND_KNN_B = [{4, 2}, {3, 2}, {4, 0}, {1, 5}, {0, 2}, {3, 1}]


def test_knn_sets_on_hand_built_features() -> None:
    assert [set(row) for row in knn_indices(HAND_A, 2).tolist()] == HAND_KNN_A
    assert [set(row) for row in knn_indices(HAND_B, 2).tolist()] == HAND_KNN_B


def test_mutual_knn_hand_computed() -> None:
    assert mutual_knn(HAND_A, HAND_B, k=2) == pytest.approx(5 / 12, abs=1e-7)
    matrix = mutual_knn_matrix(HAND_A[None], HAND_B[None], k=2)
    assert matrix.shape == (1, 1)
    assert matrix.item() == pytest.approx(5 / 12, abs=1e-7)


def test_mutual_knn_matches_set_reference() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 7)), rng.normal(size=(50, 4))
    b[:, :2] += a[:, :2]  # partly shared structure

    def neighbours(x: np.ndarray, k: int) -> list[set[int]]:
        sims = x @ x.T
        np.fill_diagonal(sims, -np.inf)
        return [set(np.argsort(-row)[:k].tolist()) for row in sims]

    k = 6
    expected = np.mean([len(p & q) / k for p, q in zip(neighbours(a, k), neighbours(b, k))])
    got = mutual_knn(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), k)
    assert got == pytest.approx(expected, abs=1e-7)


@pytest.mark.parametrize("metric", sorted(PAIR_METRICS))
def test_identical_features_score_one(metric: str) -> None:
    feats = torch.nn.functional.normalize(
        torch.randn(40, 16, generator=torch.Generator().manual_seed(1)), dim=-1
    )
    assert PAIR_METRICS[metric](feats, feats, 5) == pytest.approx(1.0, abs=1e-4)
    layers = torch.stack([feats, feats.roll(1, dims=-1) * 3])
    matrix = alignment_matrix(metric, layers, layers, 5)
    assert torch.allclose(matrix.diagonal(), torch.ones(2, dtype=torch.float64), atol=1e-4)


@pytest.mark.parametrize("metric", sorted(PAIR_METRICS))
def test_invariant_to_feature_scaling(metric: str) -> None:
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 30, 12, generator=gen), torch.randn(4, 30, 9, generator=gen)
    b[0] += a[1, :, :9]
    base = alignment_matrix(metric, prepare_features(a), prepare_features(b), 5)
    scaled = alignment_matrix(metric, prepare_features(a * 250.0), prepare_features(b * 0.01), 5)
    assert torch.allclose(base, scaled, atol=1e-5)
    raw = PAIR_METRICS[metric](a[1], b[0], 5)
    assert PAIR_METRICS[metric](a[1] * 7.0, b[0] * 0.2, 5) == pytest.approx(raw, abs=1e-4)


@pytest.mark.parametrize("metric", sorted(MATRIX_METRICS))
def test_vectorised_matrix_equals_pairwise_loop(metric: str) -> None:
    gen = torch.Generator().manual_seed(3)
    a, b = torch.randn(3, 36, 10, generator=gen), torch.randn(5, 36, 6, generator=gen)
    b[2] = a[0] @ torch.randn(10, 6, generator=gen)
    a, b = prepare_features(a), prepare_features(b)
    expected = torch.tensor([[PAIR_METRICS[metric](x, y, 4) for y in b] for x in a], dtype=torch.float64)
    assert torch.allclose(alignment_matrix(metric, a, b, 4), expected, rtol=0, atol=1e-10)


def test_cka_matches_feature_space_formula() -> None:
    """Kornblith et al. 2019, eq. 5 (linear CKA via centred features), computed in float64 numpy."""
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(25, 6)), rng.normal(size=(25, 4))
    y[:, 0] += 2 * x[:, 0]
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc))
    assert cka(torch.tensor(x), torch.tensor(y)) == pytest.approx(expected, rel=1e-5)


def test_unbiased_hsic_matches_u_statistic() -> None:
    """Song et al. 2012: HSIC_u is the U-statistic of k_ij l_ij + k_ij l_qr - 2 k_ij l_iq over distinct (i,j,q,r)."""
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=(7, 3)), rng.normal(size=(7, 2))
    kern_k, kern_l = x @ x.T, y @ y.T
    terms = [
        kern_k[i, j] * kern_l[i, j] + kern_k[i, j] * kern_l[q, r] - 2 * kern_k[i, j] * kern_l[i, q]
        for i, j, q, r in itertools.permutations(range(7), 4)
    ]
    got = hsic_unbiased(torch.tensor(kern_k), torch.tensor(kern_l)).item()
    assert got == pytest.approx(np.mean(terms), rel=1e-9)


def test_cknna_with_all_neighbours_equals_unbiased_cka() -> None:
    """With k = N - 1 every off-diagonal pair is a mutual neighbour, so the mask is a no-op."""
    gen = torch.Generator().manual_seed(6)
    a, b = (
        torch.randn(12, 5, generator=gen, dtype=torch.float64),
        torch.randn(12, 3, generator=gen, dtype=torch.float64),
    )
    b[:, 0] += a[:, 0]
    assert cknna(a, b, k=11) == pytest.approx(unbiased_cka(a, b), abs=1e-9)


def test_cknna_is_not_unbiased_cka_for_small_k() -> None:
    gen = torch.Generator().manual_seed(7)
    a, b = torch.randn(30, 5, generator=gen), torch.randn(30, 3, generator=gen)
    b[:, 0] += a[:, 0]
    assert abs(cknna(a, b, k=3) - unbiased_cka(a, b)) > 1e-3


@pytest.mark.parametrize("shape", [(7,), (40, 3, 5), (101, 13)])
def test_quantile_matches_numpy(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(8))
    for q in (0.95, 0.5, 0.01, 1.0):
        assert quantile_abs(x, q).item() == pytest.approx(np.quantile(np.abs(x.numpy()), q), rel=1e-6)


def test_prepare_features_clamps_then_normalises() -> None:
    x = torch.randn(20, 3, 8, generator=torch.Generator().manual_seed(9))
    x[0, 0, 0] = 1000.0  # outlier
    bound = np.quantile(np.abs(x.numpy()), 0.95)
    expected = np.clip(x.numpy(), -bound, bound)
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    assert np.allclose(prepare_features(x).numpy(), expected, atol=1e-6)
    assert torch.allclose(prepare_features(x, q=1.0), torch.nn.functional.normalize(x, dim=-1))


def _heteroscedastic_features(seed: int = 10) -> torch.Tensor:
    """[N, L, D] features with a per-sample "massive activation" channel and half the samples 3x larger,
    where the two clamp modes give clearly different bounds."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(24, 3, 10, generator=gen)
    x[:, :, 3] += 200 * torch.rand(24, 3, generator=gen)
    x[:12] *= 3
    return x


def test_per_sample_mean_bound_matches_numpy() -> None:
    """platonic-rep without --precise: mean over samples of each sample's quantile over its L*D entries."""
    x = _heteroscedastic_features()
    flat = np.abs(x.numpy()).reshape(24, -1)
    for q in (0.95, 0.5, 0.01, 1.0):
        expected = np.quantile(flat, q, axis=1).mean()
        assert per_sample_quantile_abs(x, q).item() == pytest.approx(expected, rel=1e-6)
    assert per_sample_quantile_abs(x[:, 0], 0.95).item() == pytest.approx(
        np.quantile(np.abs(x[:, 0].numpy()), 0.95, axis=1).mean(), rel=1e-6
    )


@pytest.mark.parametrize("mode", ["precise", "per_sample_mean"])
def test_prepare_features_clamp_modes_match_numpy(mode: str) -> None:
    x = _heteroscedastic_features()
    values = np.abs(x.numpy())
    if mode == "precise":
        bound = np.quantile(values, 0.95)
    else:
        bound = np.quantile(values.reshape(len(values), -1), 0.95, axis=1).mean()
    expected = np.clip(x.numpy(), -bound, bound)
    expected /= np.linalg.norm(expected, axis=-1, keepdims=True)
    assert np.allclose(prepare_features(x, 0.95, mode).numpy(), expected, atol=1e-6)
    other = "per_sample_mean" if mode == "precise" else "precise"
    assert not np.allclose(prepare_features(x, 0.95, other).numpy(), expected, atol=1e-3)


def test_bad_inputs_raise() -> None:
    a = torch.randn(5, 3)
    with pytest.raises(ValueError, match="k must satisfy"):
        mutual_knn(a, a, k=5)
    with pytest.raises(ValueError, match="sample counts differ"):
        mutual_knn(a, torch.randn(6, 3), k=2)
    with pytest.raises(ValueError, match="k must satisfy 2"):
        cknna(a, a, k=1)
    with pytest.raises(ValueError, match="unknown metric"):
        alignment_matrix("svcca", a[None], a[None], 2)
    with pytest.raises(ValueError, match="layers, N, D"):
        alignment_matrix("cka", a, a, 2)
    with pytest.raises(ValueError, match="quantile"):
        prepare_features(a, q=0.0)
    with pytest.raises(ValueError, match="unknown outlier_clamp 'exact'"):
        prepare_features(a, outlier_clamp="exact")


@pytest.mark.parametrize("metric", ["cka", "unbiased_cka"])
def test_kernel_metrics_are_symmetric_to_float64_rounding(metric):
    """Nearly identical layers (HSIC terms cancel heavily) stay symmetric to ~1e-12, batched and pairwise."""
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=gen)
    layers = torch.stack([base + 1e-3 * torch.randn(64, 48, generator=gen) for _ in range(5)])
    matrix = alignment_matrix(metric, layers, layers, 4)
    assert matrix.dtype == torch.float64
    assert torch.allclose(matrix, matrix.T, rtol=0, atol=1e-12)
    pair = PAIR_METRICS[metric]
    assert pair(layers[1], layers[3], 4) == pytest.approx(pair(layers[3], layers[1], 4), abs=1e-12)
    assert pair(layers[1], layers[3], 4) == pytest.approx(matrix[1, 3].item(), abs=1e-10)
