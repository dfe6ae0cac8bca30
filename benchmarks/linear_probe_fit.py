"""Linear-probe fit: scikit-learn LogisticRegression vs the torch full-batch L-BFGS path (analysis/linear_probe.py).

Both minimise the same objective (C·ΣCE + ½‖W‖², lbfgs, gradient tolerance 1e-4, max_iter 1000) at the
same C on generated random-projection features: class centres in a low-dimensional latent space plus
within-class noise, projected to `dim` features by a fixed Gaussian matrix, plus isotropic noise. The default
size is the paper's fast setting (50,000 × 1,152 SigLIP-So400m-sized features, 1,000 ImageNet classes);
`--quick` runs a small version. Prints both wall times, their ratio and both top-1 accuracies in one run.

    python benchmarks/linear_probe_fit.py --quick
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from analysis.linear_probe import fit_logreg, fit_torch_lbfgs, topk_accuracy


def make_features(
    n_train: int, n_eval: int, dim: int, n_classes: int, latent: int, noise: float, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Random-projection features: (centre[y] + noise·ε) @ R / √latent + 0.1·ε′, float32."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, latent))
    projection = rng.standard_normal((latent, dim)) / np.sqrt(latent)

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, n_classes, size=n)
        z = centres[labels] + noise * rng.standard_normal((n, latent))
        x = z @ projection + 0.1 * rng.standard_normal((n, dim))
        return x.astype(np.float32), labels

    return (*sample(n_train), *sample(n_eval))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: 5,000 × 256 features, 100 classes")
    parser.add_argument("--n-train", type=int, default=50_000, help="training samples")
    parser.add_argument("--n-eval", type=int, default=10_000, help="evaluation samples")
    parser.add_argument("--dim", type=int, default=1152, help="feature dimension")
    parser.add_argument("--classes", type=int, default=1000, help="number of classes")
    parser.add_argument("--latent", type=int, default=64, help="latent dimension of the class structure")
    parser.add_argument(
        "--noise", type=float, default=2.0, help="within-class latent noise (sets the difficulty)"
    )
    parser.add_argument("--C", type=float, default=1.0, help="inverse L2 strength, the same for both solvers")
    parser.add_argument("--max-iter", type=int, default=1000, help="solver iterations")
    parser.add_argument("--device", default="cpu", help="device of the torch path (the comparison is on CPU)")
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_train, args.n_eval, args.dim, args.classes = 5_000, 2_000, 256, 100
    train_x, train_y, eval_x, eval_y = make_features(
        args.n_train, args.n_eval, args.dim, args.classes, args.latent, args.noise, args.seed
    )
    print(f"features {args.n_train} × {args.dim}, {args.classes} classes, eval {args.n_eval}, C={args.C}, "
          f"max_iter={args.max_iter}, torch threads {torch.get_num_threads()}, device {args.device}")  # fmt: skip
    results = {}
    for name, fit in (
        ("sklearn", lambda: fit_logreg(train_x, train_y, args.C, args.max_iter)),
        ("torch_lbfgs", lambda: fit_torch_lbfgs(train_x, train_y, args.C, args.max_iter, device=args.device)),
    ):
        started = time.perf_counter()
        model = fit()
        seconds = time.perf_counter() - started
        results[name] = (seconds, topk_accuracy(model, eval_x, eval_y, 1), model.n_iter)
        print(f"{name:12s} {seconds:9.2f} s  top-1 {100 * results[name][1]:6.2f}%  iterations {model.n_iter}")
    (sk_time, sk_acc, _), (th_time, th_acc, _) = results["sklearn"], results["torch_lbfgs"]
    print(f"time ratio sklearn / torch = {sk_time / th_time:.2f}x; "
          f"top-1 difference torch - sklearn = {100 * (th_acc - sk_acc):+.2f} points")  # fmt: skip


if __name__ == "__main__":
    main()
