"""Representation-alignment metrics of the Platonic Representation Hypothesis (Huh et al. 2024).

Definitions follow minyoungg/platonic-rep `metrics.py` (class `AlignmentMetrics`) and its
`measure_alignment.py` preprocessing:

- `prepare_features`: clamp every entry of one model's `[N, L, D]` feature tensor to [-b, b], then
  L2-normalise each sample. The bound b follows platonic-rep `remove_outliers` in one of two modes
  (`OUTLIER_CLAMPS`): "precise" (our default; platonic-rep `--precise`): b = the 95th percentile of
  |x| over the whole tensor (all samples and layers); "per_sample_mean" (platonic-rep without
  `--precise`, the command in its README): b = the mean over samples of each sample's 95th
  percentile of |x| over its L·D entries. Percentiles interpolate linearly (numpy/torch.quantile,
  as platonic-rep's per-sample path); its `--precise` path takes the sorted value at index
  int(q·n) instead, at most one rank away.
- `mutual_knn` (Huh et al. 2024, Sec. 2 / App. A): top-k neighbours by inner product within each
  representation, self excluded; score = mean over samples of |kNN_A(i) ∩ kNN_B(i)| / k.
- `cka`: centred kernel alignment with a linear kernel and the biased HSIC estimator
  HSIC(K, L) = tr(K H L H) (Kornblith et al. 2019, eq. 3 and Gretton et al. 2005);
  CKA = HSIC(K, L) / (sqrt(HSIC(K, K) HSIC(L, L)) + 1e-6), epsilon as in platonic-rep.
- `unbiased_cka`: the same with the unbiased HSIC estimator of Song et al. 2012, eq. 5.
- `cknna` (Huh et al. 2024, App. A, "CKNNA"): unbiased HSIC of the kernels restricted to mutual
  nearest neighbours, mask(i, j) = [j ∈ kNN_K(i)] · [j ∈ kNN_L(i)], normalised like CKA.

Pairwise functions take two `[N, D]` feature matrices and literally follow the reference code.
`alignment_matrix` scores every (layer of A, layer of B) pair at once: each layer's Gram matrix and
kNN index set is computed once, and the pairs are compared with batched tensor ops instead of a
Python loop over pairs. Tests pin the matrix functions to the pairwise ones.

Kernels and HSIC terms are computed in float64: the unbiased HSIC is a difference of large sums, and
in float32 which digits survive depends on the BLAS kernel (a symmetric CKA came out asymmetric by
~2e-4 on one machine). In float64 a symmetric metric is symmetric to ~1e-12 on every BLAS. kNN sets
are still ranked on float32 inner products, as in the reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

EPS = 1e-6  # denominator guard of platonic-rep's CKA and CKNNA
# Precision of kernels and HSIC terms (module docstring); benchmarks/cka.py times float32 against it.
KERNEL_DTYPE = torch.float64


OUTLIER_CLAMPS: tuple[str, ...] = ("precise", "per_sample_mean")


def _quantile_last_dim(values: Tensor, q: float) -> Tensor:
    """q-quantile along the last dim, linear interpolation (as numpy/torch.quantile).

    Uses `kthvalue`, which has no size limit (torch.quantile refuses tensors above 2**24 entries).
    """
    n = values.shape[-1]
    pos = q * (n - 1)
    lo, hi = int(pos), min(int(pos) + 1, n - 1)
    lo_val = values.kthvalue(lo + 1, dim=-1).values
    hi_val = values.kthvalue(hi + 1, dim=-1).values if hi != lo else lo_val
    return lo_val + (hi_val - lo_val) * (pos - lo)


def quantile_abs(feats: Tensor, q: float) -> Tensor:
    """q-quantile of |feats| over all entries (the "precise" clamp bound)."""
    return _quantile_last_dim(feats.detach().abs().flatten().float(), q)


def per_sample_quantile_abs(feats: Tensor, q: float) -> Tensor:
    """Mean over samples (dim 0) of each sample's q-quantile of |x| over its other entries
    (the "per_sample_mean" clamp bound)."""
    per_sample = feats.detach().abs().float().reshape(feats.shape[0], -1)
    return _quantile_last_dim(per_sample, q).mean()


def prepare_features(feats: Tensor, q: float = 0.95, outlier_clamp: str = "precise") -> Tensor:
    """Clamp outliers at a bound from the q-quantile of |x|, then L2-normalise the last dim.

    `feats` is one model's `[N, L, D]` (or `[N, D]`) tensor; platonic-rep `prepare_features` +
    the normalisation in `compute_score`. `outlier_clamp` picks the bound (module docstring):
    "precise" = quantile over the whole tensor, "per_sample_mean" = mean of per-sample quantiles.
    q = 1 skips the clamp.
    """
    if not 0.0 < q <= 1.0:
        raise ValueError(f"outlier quantile must be in (0, 1], got {q}")
    if outlier_clamp not in OUTLIER_CLAMPS:
        raise ValueError(f"unknown outlier_clamp {outlier_clamp!r}; choose from {OUTLIER_CLAMPS}")
    feats = feats.float()
    if q < 1.0:
        bound = quantile_abs(feats, q) if outlier_clamp == "precise" else per_sample_quantile_abs(feats, q)
        feats = feats.clamp(-bound, bound)
    return torch.nn.functional.normalize(feats, p=2, dim=-1)


def _check_pair(feats_a: Tensor, feats_b: Tensor) -> None:
    if feats_a.ndim != 2 or feats_b.ndim != 2:
        raise ValueError(f"expected [N, D] features, got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}")
    if feats_a.shape[0] != feats_b.shape[0]:
        raise ValueError(f"sample counts differ: {feats_a.shape[0]} vs {feats_b.shape[0]}")


def _check_k(k: int, n: int, minimum: int = 1) -> None:
    if not minimum <= k < n:
        raise ValueError(f"k must satisfy {minimum} <= k < number of samples ({n}), got k={k}")


def gram(feats: Tensor) -> Tensor:
    """Linear-kernel Gram matrices: `[..., N, D]` -> `[..., N, N]`."""
    return feats @ feats.transpose(-1, -2)


def knn_indices(feats: Tensor, k: int) -> Tensor:
    """Indices of the k largest inner products per sample, self excluded: `[..., N, D]` -> `[..., N, k]`."""
    _check_k(k, feats.shape[-2])
    sims = gram(feats.float())
    sims.diagonal(dim1=-2, dim2=-1).fill_(float("-inf"))
    return sims.topk(k, dim=-1).indices


def knn_mask(knn: Tensor, n: int) -> Tensor:
    """One-hot neighbour matrix: mask[..., i, j] = 1 if j is among sample i's neighbours."""
    mask = torch.zeros(*knn.shape[:-1], n, dtype=torch.float32, device=knn.device)
    return mask.scatter_(-1, knn, 1.0)


def mutual_knn(feats_a: Tensor, feats_b: Tensor, k: int = 10) -> float:
    """Mutual k-NN alignment (Huh et al. 2024): mean_i |kNN_A(i) ∩ kNN_B(i)| / k."""
    _check_pair(feats_a, feats_b)
    n = feats_a.shape[0]
    mask_a = knn_mask(knn_indices(feats_a, k), n)
    mask_b = knn_mask(knn_indices(feats_b, k), n)
    return ((mask_a * mask_b).sum(dim=1) / k).mean().item()


def hsic_biased(kern_k: Tensor, kern_l: Tensor) -> Tensor:
    """Biased HSIC estimator tr(K H L H), H = I - 11ᵀ/m (Gretton et al. 2005)."""
    m = kern_k.shape[0]
    h = torch.eye(m, dtype=kern_k.dtype, device=kern_k.device) - 1.0 / m
    return torch.trace(kern_k @ h @ kern_l @ h)


def hsic_unbiased(kern_k: Tensor, kern_l: Tensor) -> Tensor:
    """Unbiased HSIC estimator (Song et al. 2012, eq. 5), as in platonic-rep.

    [tr(K̃ L̃ᵀ) + 1ᵀK̃1 · 1ᵀL̃1 / ((m-1)(m-2)) - 2/(m-2) · 1ᵀK̃L̃1] / (m(m-3)), K̃, L̃ with zero diagonal.
    """
    m = kern_k.shape[0]
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    kt = kern_k.clone().fill_diagonal_(0)
    lt = kern_l.clone().fill_diagonal_(0)
    value = (
        torch.sum(kt * lt.T)
        + torch.sum(kt) * torch.sum(lt) / ((m - 1) * (m - 2))
        - 2 * torch.sum(kt @ lt) / (m - 2)
    )
    return value / (m * (m - 3))


def cka(feats_a: Tensor, feats_b: Tensor, k: int | None = None, unbiased: bool = False) -> float:
    """Linear CKA (Kornblith et al. 2019); `unbiased` switches to the Song et al. 2012 HSIC. `k` unused."""
    _check_pair(feats_a, feats_b)
    kern_k, kern_l = gram(feats_a.to(KERNEL_DTYPE)), gram(feats_b.to(KERNEL_DTYPE))
    hsic = hsic_unbiased if unbiased else hsic_biased
    value = hsic(kern_k, kern_l) / (torch.sqrt(hsic(kern_k, kern_k) * hsic(kern_l, kern_l)) + EPS)
    return value.item()


def unbiased_cka(feats_a: Tensor, feats_b: Tensor, k: int | None = None) -> float:
    """Linear CKA with the unbiased HSIC estimator (Song et al. 2012). `k` unused."""
    return cka(feats_a, feats_b, unbiased=True)


def cknna(feats_a: Tensor, feats_b: Tensor, k: int = 10) -> float:
    """CKNNA (Huh et al. 2024, App. A): unbiased-HSIC CKA restricted to mutual k-nearest neighbours.

    Follows platonic-rep `cknna(unbiased=True, distance_agnostic=False)`: for kernels X, Y the
    similarity is HSIC_u(M ∘ X, M ∘ Y) with M = kNN-mask(X) ∘ kNN-mask(Y) (self excluded). As in the
    reference, the score is not exactly symmetric in (A, B): the kNN masks are not symmetric matrices.
    """
    _check_pair(feats_a, feats_b)
    n = feats_a.shape[0]
    _check_k(k, n, minimum=2)
    kern_k, kern_l = gram(feats_a.to(KERNEL_DTYPE)), gram(feats_b.to(KERNEL_DTYPE))
    mask_k = knn_mask(knn_indices(feats_a, k), n)
    mask_l = knn_mask(knn_indices(feats_b, k), n)

    def similarity(x: Tensor, mask_x: Tensor, y: Tensor, mask_y: Tensor) -> Tensor:
        mask = mask_x * mask_y
        return hsic_unbiased(mask * x, mask * y)

    sim_kl = similarity(kern_k, mask_k, kern_l, mask_l)
    sim_kk = similarity(kern_k, mask_k, kern_k, mask_k)
    sim_ll = similarity(kern_l, mask_l, kern_l, mask_l)
    return sim_kl.item() / (torch.sqrt(sim_kk * sim_ll) + EPS).item()


PairMetric = Callable[[Tensor, Tensor, int], float]
PAIR_METRICS: dict[str, PairMetric] = {
    "mutual_knn": mutual_knn,
    "cka": cka,
    "unbiased_cka": unbiased_cka,
    "cknna": cknna,
}


def _flat(x: Tensor) -> Tensor:
    return x.reshape(x.shape[0], -1)


def _check_layers(feats_a: Tensor, feats_b: Tensor) -> int:
    if feats_a.ndim != 3 or feats_b.ndim != 3:
        raise ValueError(
            f"expected [layers, N, D] features, got {tuple(feats_a.shape)} and {tuple(feats_b.shape)}"
        )
    if feats_a.shape[1] != feats_b.shape[1]:
        raise ValueError(f"sample counts differ: {feats_a.shape[1]} vs {feats_b.shape[1]}")
    return feats_a.shape[1]


def mutual_knn_matrix(feats_a: Tensor, feats_b: Tensor, k: int = 10) -> Tensor:
    """Mutual k-NN for every layer pair: `[La, N, Da]`, `[Lb, N, Db]` -> `[La, Lb]`.

    kNN sets are computed once per layer; out[a, b] = Σ_i Σ_{j ∈ kNN_b(i)} mask_a[i, j] / (N k),
    a single gather of the `[La, N, N]` one-hot masks at the `[Lb, N, k]` neighbour indices.
    """
    n = _check_layers(feats_a, feats_b)
    mask_a = knn_mask(knn_indices(feats_a, k), n)
    knn_b = knn_indices(feats_b, k)
    rows = torch.arange(n, device=knn_b.device).view(1, n, 1)
    hits = mask_a[:, rows, knn_b]  # [La, Lb, N, k]
    return hits.sum(dim=(-1, -2)) / (n * k)


def _centered_grams(feats: Tensor) -> Tensor:
    centred = feats.to(KERNEL_DTYPE) - feats.to(KERNEL_DTYPE).mean(dim=-2, keepdim=True)
    return gram(centred)  # = H K H for the linear kernel


def _cka_from_hsic(hsic_ab: Tensor, hsic_aa: Tensor, hsic_bb: Tensor) -> Tensor:
    return hsic_ab / (torch.sqrt(hsic_aa[:, None] * hsic_bb[None, :]) + EPS)


def cka_matrix(feats_a: Tensor, feats_b: Tensor, k: int | None = None) -> Tensor:
    """Linear CKA (biased HSIC) for every layer pair; tr(KHLH) = <HKH, HLH>_F. `k` unused."""
    _check_layers(feats_a, feats_b)
    ca, cb = _flat(_centered_grams(feats_a)), _flat(_centered_grams(feats_b))
    return _cka_from_hsic(ca @ cb.T, (ca * ca).sum(-1), (cb * cb).sum(-1))


def _hsic_unbiased_terms(frob: Tensor, sum_k: Tensor, sum_l: Tensor, sum_kl: Tensor, m: int) -> Tensor:
    """Song et al. 2012 eq. 5 from its four sums (each `[La, Lb]`)."""
    if m < 4:
        raise ValueError(f"the unbiased HSIC needs at least 4 samples, got {m}")
    return (frob + sum_k * sum_l / ((m - 1) * (m - 2)) - 2 * sum_kl / (m - 2)) / (m * (m - 3))


def _zero_diag_grams(feats: Tensor) -> Tensor:
    grams = gram(feats.to(KERNEL_DTYPE))
    grams.diagonal(dim1=-2, dim2=-1).zero_()
    return grams


def unbiased_cka_matrix(feats_a: Tensor, feats_b: Tensor, k: int | None = None) -> Tensor:
    """Unbiased-HSIC linear CKA for every layer pair; 1ᵀK̃L̃1 = (K̃1)·(L̃1) as K̃ is symmetric. `k` unused."""
    m = _check_layers(feats_a, feats_b)
    ka, kb = _zero_diag_grams(feats_a), _zero_diag_grams(feats_b)
    fa, fb = _flat(ka), _flat(kb)
    ra, rb = ka.sum(-1), kb.sum(-1)  # row sums [L, N]
    sa, sb = fa.sum(-1), fb.sum(-1)

    def hsic(f1: Tensor, r1: Tensor, s1: Tensor, f2: Tensor, r2: Tensor, s2: Tensor) -> Tensor:
        return _hsic_unbiased_terms(f1 @ f2.T, s1[:, None], s2[None, :], r1 @ r2.T, m)

    hsic_ab = hsic(fa, ra, sa, fb, rb, sb)
    hsic_aa = hsic(fa, ra, sa, fa, ra, sa).diagonal()
    hsic_bb = hsic(fb, rb, sb, fb, rb, sb).diagonal()
    return _cka_from_hsic(hsic_ab, hsic_aa, hsic_bb)


def cknna_matrix(feats_a: Tensor, feats_b: Tensor, k: int = 10) -> Tensor:
    """CKNNA for every layer pair, vectorised form of `cknna`.

    With masks M_a, M_b and mask M = M_a ∘ M_b, the unbiased HSIC of (M ∘ K_a, M ∘ L_b) needs
    Σ (M∘K)(M∘L)ᵀ = <M_a∘M_aᵀ∘K_a, M_b∘M_bᵀ∘L_b>_F, 1ᵀ(M∘K)1 = <M_a∘K_a, M_b>_F,
    1ᵀ(M∘L)1 = <M_a, M_b∘L_b>_F and 1ᵀ(M∘K)(M∘L)1 = Σ_j colsum_j(M∘K) rowsum_j(M∘L).
    """
    m = _check_layers(feats_a, feats_b)
    _check_k(k, m, minimum=2)
    ka, kb = gram(feats_a.to(KERNEL_DTYPE)), gram(feats_b.to(KERNEL_DTYPE))
    ma, mb = (
        knn_mask(knn_indices(feats_a, k), m).to(KERNEL_DTYPE),
        knn_mask(knn_indices(feats_b, k), m).to(KERNEL_DTYPE),
    )
    mka, mkb = ma * ka, mb * kb
    frob = _flat(mka * ma.transpose(-1, -2)) @ _flat(mkb * mb.transpose(-1, -2)).T
    sum_k = _flat(mka) @ _flat(mb).T
    sum_l = _flat(ma) @ _flat(mkb).T
    col_k = torch.einsum("aij,bij->abj", mka, mb)
    row_l = torch.einsum("aji,bji->abj", ma, mkb)
    sim_ab = _hsic_unbiased_terms(frob, sum_k, sum_l, (col_k * row_l).sum(-1), m)
    sim_aa = torch.stack([hsic_unbiased(x, x) for x in mka])
    sim_bb = torch.stack([hsic_unbiased(x, x) for x in mkb])
    return _cka_from_hsic(sim_ab, sim_aa, sim_bb)


MatrixMetric = Callable[[Tensor, Tensor, int], Tensor]
MATRIX_METRICS: dict[str, MatrixMetric] = {
    "mutual_knn": mutual_knn_matrix,
    "cka": cka_matrix,
    "unbiased_cka": unbiased_cka_matrix,
    "cknna": cknna_matrix,
}


def alignment_matrix(metric: str, feats_a: Tensor, feats_b: Tensor, k: int = 10) -> Tensor:
    """Score every layer pair of `[La, N, Da]` and `[Lb, N, Db]` features with `metric` -> float64 `[La, Lb]`."""
    if metric not in MATRIX_METRICS:
        raise ValueError(f"unknown metric {metric!r}; choose from {sorted(MATRIX_METRICS)}")
    return MATRIX_METRICS[metric](feats_a, feats_b, k).double()
