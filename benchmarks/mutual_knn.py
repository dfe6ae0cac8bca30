"""Mutual k-NN over every layer pair: vectorised `mutual_knn_matrix` vs a per-pair loop, in one run.

The setting of the Platonic alignment study (Huh et al. 2024; DESIGN §5): 1,024 samples, a
27-hidden-state vision encoder × a 29-hidden-state LLM (random features; SigLIP2-So/16 width 1152,
Qwen2.5-1.5B width 1536), k = 10. The loop calls the pairwise `mutual_knn` for each of the
27 × 29 pairs, recomputing both kNN sets every time, as a straightforward port of platonic-rep's
`compute_score` does; the vectorised path computes each layer's kNN once and compares all pairs
with one gather. Both results are checked equal. Run: `python -m benchmarks.mutual_knn` or
`python benchmarks/mutual_knn.py`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable, Sequence

import torch

from analysis.alignment_metrics import mutual_knn, mutual_knn_matrix


def loop_matrix(feats_a: torch.Tensor, feats_b: torch.Tensor, k: int) -> torch.Tensor:
    """The straightforward reference: one pairwise mutual_knn call (kNN recomputed) per layer pair."""
    return torch.tensor([[mutual_knn(a, b, k) for b in feats_b] for a in feats_a])


def timed(fn: Callable[[], torch.Tensor], device: torch.device) -> tuple[float, torch.Tensor]:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num_samples", type=int, default=1024, help="samples (paper: 1024)")
    parser.add_argument("--vision_layers", type=int, default=27, help="hidden states of the vision encoder")
    parser.add_argument("--language_layers", type=int, default=29, help="hidden states of the LLM")
    parser.add_argument("--vision_dim", type=int, default=1152, help="vision feature width")
    parser.add_argument("--language_dim", type=int, default=1536, help="language feature width")
    parser.add_argument("--k", type=int, default=10, help="neighbours (paper: 10)")
    parser.add_argument("--device", default="auto", help="torch device (auto = cuda if available)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random features")
    args = parser.parse_args(argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    )
    generator = torch.Generator().manual_seed(args.seed)
    feats_a = torch.randn(args.vision_layers, args.num_samples, args.vision_dim, generator=generator)
    feats_b = torch.randn(args.language_layers, args.num_samples, args.language_dim, generator=generator)
    feats_a = torch.nn.functional.normalize(feats_a, dim=-1).to(device)
    feats_b = torch.nn.functional.normalize(feats_b, dim=-1).to(device)
    mutual_knn_matrix(feats_a[:1], feats_b[:1], args.k)  # warm-up (allocator, kernels)

    t_vec, vec = timed(lambda: mutual_knn_matrix(feats_a, feats_b, args.k).cpu(), device)
    t_loop, loop = timed(lambda: loop_matrix(feats_a, feats_b, args.k), device)
    max_diff = (vec - loop).abs().max().item()
    if max_diff > 1e-6:
        raise AssertionError(f"vectorised and loop results differ by {max_diff}")
    pairs = args.vision_layers * args.language_layers
    print(
        f"mutual k-NN, {args.num_samples} samples, {args.vision_layers} x {args.language_layers} = {pairs} "
        f"layer pairs, k={args.k}, dims {args.vision_dim}/{args.language_dim}, device {device} "
        f"({torch.get_num_threads()} CPU threads)"
    )
    print(f"vectorised: {t_vec:8.3f} s")
    print(f"per-pair loop: {t_loop:8.3f} s")
    print(f"speed-up (loop / vectorised): {t_loop / t_vec:.1f}x   max |difference| = {max_diff:.1e}")
    return {"vectorised_s": t_vec, "loop_s": t_loop, "ratio": t_loop / t_vec}


if __name__ == "__main__":
    main()
