"""All-layer-pair CKA, unbiased CKA and CKNNA in float64 (the default) vs float32 kernels, in one run.

The Platonic alignment setting (Huh et al. 2024; DESIGN §5): 1,024 samples, 27 vision × 29 language
hidden states (random features). `analysis.alignment_metrics` computes kernels and HSIC terms in
float64 so that the cancelling sums of the unbiased HSIC are exact to ~1e-12 on every BLAS; this
measures what that costs against float32 kernels (the code before that change) and how far the two
disagree. Run: `python -m benchmarks.cka` (`--quick` for a smaller setting).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from analysis import alignment_metrics
from analysis.alignment_metrics import alignment_matrix, prepare_features

METRICS = ("cka", "unbiased_cka", "cknna")


def timed_matrix(
    metric: str, a: torch.Tensor, b: torch.Tensor, k: int, dtype: torch.dtype
) -> tuple[float, torch.Tensor]:
    previous, alignment_metrics.KERNEL_DTYPE = alignment_metrics.KERNEL_DTYPE, dtype
    try:
        start = time.perf_counter()
        matrix = alignment_matrix(metric, a, b, k)
        return time.perf_counter() - start, matrix
    finally:
        alignment_metrics.KERNEL_DTYPE = previous


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_samples", type=int, default=1024)
    parser.add_argument("--vision_layers", type=int, default=27)
    parser.add_argument("--language_layers", type=int, default=29)
    parser.add_argument("--dim", type=int, default=256, help="feature width (kernels are N x N either way)")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="256 samples, 6 x 7 layers")
    args = parser.parse_args(argv)
    if args.quick:
        args.num_samples, args.vision_layers, args.language_layers = 256, 6, 7
    gen = torch.Generator().manual_seed(0)
    a = prepare_features(torch.randn(args.vision_layers, args.num_samples, args.dim, generator=gen))
    b = prepare_features(torch.randn(args.language_layers, args.num_samples, args.dim, generator=gen))
    print(f"{args.num_samples} samples, {args.vision_layers} x {args.language_layers} layers, k={args.k}")
    print("| metric | float32 s | float64 s | float64 / float32 time | max abs difference |")
    print("|---|---|---|---|---|")
    for metric in METRICS:
        t32, m32 = timed_matrix(metric, a, b, args.k, torch.float32)
        t64, m64 = timed_matrix(metric, a, b, args.k, torch.float64)
        diff = (m64 - m32.double()).abs().max().item()
        print(f"| {metric} | {t32:.3f} | {t64:.3f} | {t64 / t32:.2f}x | {diff:.2e} |")


if __name__ == "__main__":
    main()
