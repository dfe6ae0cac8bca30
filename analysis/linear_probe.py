"""Linear probe on frozen pooled features (openai/CLIP protocol, DESIGN §5).

L2 logistic regression (scikit-learn, lbfgs, max_iter 1000). C is swept on a validation split carved from
the training set (log-spaced coarse grid, then refinement around the best value by halving decade steps),
the model is refit on train + validation at the best C and scored top-1/top-5 on the evaluation split.
The paper runs this on a seeded random 50K subset of ImageNet train (`random_subset`).

`torch_lbfgs` solves the same problem full-batch with torch's L-BFGS (on the GPU when there is one).
scikit-learn minimises C·ΣCE + ½‖W‖² (intercept unpenalised); dividing by C·N gives the equivalent
mean CE + ‖W‖²/(2CN), which is what the torch path minimises, with the same stopping rules (max-abs
gradient ≤ 1e-4, at most max_iter iterations and 15,000 function evaluations, history 10).
Two classes use one weight vector, as scikit-learn does. `prototype` uses the L2-normalised class means of
L2-normalised features as weights (nearest class mean by cosine similarity; no C).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from analysis.features import (
    DEFAULT_CACHE_DIR,
    EncoderSpec,
    FeatureOptions,
    extract_features,
    feature_name,
    read_encoder_spec,
    resolve_device,
)
from analysis.image_sources import ImageSource, image_source_from_args

logger = logging.getLogger(__name__)

METHODS = ("logreg", "torch_lbfgs", "prototype")
DEFAULT_C_GRID = (1e-6, 1e-4, 1e-2, 1.0, 1e2, 1e4, 1e6)


@dataclass(frozen=True)
class LinearProbeConfig:
    methods: tuple[str, ...] = ("logreg", "prototype")
    c_grid: tuple[float, ...] = DEFAULT_C_GRID
    refine_steps: int = 3
    val_fraction: float = 0.2
    max_iter: int = 1000
    tol: float = 1e-4
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"LinearProbeConfig: methods must be a non-empty subset of {METHODS}; unknown {unknown}"
            )
        if not self.c_grid or min(self.c_grid) <= 0:
            raise ValueError(f"LinearProbeConfig: c_grid must hold positive values, got {self.c_grid}")
        if not 0 < self.val_fraction < 1 or self.refine_steps < 0 or self.max_iter < 1:
            raise ValueError("LinearProbeConfig: val_fraction in (0, 1), refine_steps ≥ 0, max_iter ≥ 1")


@dataclass
class LinearModel:
    """scores = f(X) @ coef.T + intercept; f L2-normalises rows when `normalize` (prototype)."""

    coef: np.ndarray
    intercept: np.ndarray
    classes: np.ndarray
    normalize: bool = False
    n_iter: int = 0

    def scores(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if self.normalize:
            features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
        scores = features @ self.coef.T + self.intercept
        return np.concatenate([np.zeros_like(scores), scores], axis=1) if len(self.classes) == 2 else scores


def random_subset(n_total: int, size: int, seed: int) -> np.ndarray:
    """Seeded uniform subset of positions (sorted), e.g. the paper's 50K ImageNet subset."""
    if size > n_total:
        raise ValueError(f"subset of {size} asked from only {n_total} items")
    return np.sort(np.random.default_rng(seed).choice(n_total, size=size, replace=False))


def carve_validation(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train/validation positions, stratified when every class has ≥ 2 members."""
    from sklearn.model_selection import train_test_split

    positions = np.arange(len(labels))
    counts = np.unique(labels, return_counts=True)[1]
    stratify = labels if counts.min() >= 2 and round(fraction * len(labels)) >= len(counts) else None
    train, val = train_test_split(positions, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(val)


def topk_accuracy(model: LinearModel, features: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Fraction of samples whose label is among the k best-scoring classes (k capped at the class count)."""
    scores = model.scores(features)
    k = min(k, scores.shape[1])
    best = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    return float((model.classes[best] == np.asarray(labels)[:, None]).any(axis=1).mean())


def mean_cross_entropy(model: LinearModel, features: np.ndarray, labels: np.ndarray) -> float:
    """Mean CE of softmax(scores); labels absent from the model's classes are ignored."""
    scores = torch.from_numpy(model.scores(features))
    lookup = {c: i for i, c in enumerate(model.classes.tolist())}
    known = np.array([label in lookup for label in labels.tolist()])
    if not known.any():
        return math.inf
    target = torch.tensor([lookup[label] for label in labels[known].tolist()])
    return float(F.cross_entropy(scores[torch.from_numpy(known)], target))


def fit_logreg(
    features: np.ndarray, labels: np.ndarray, C: float, max_iter: int = 1000, tol: float = 1e-4, seed: int = 0
) -> LinearModel:
    """scikit-learn LogisticRegression, L2 (l1_ratio 0; `penalty` is deprecated since 1.8), lbfgs."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(
        C=C, l1_ratio=0.0, solver="lbfgs", max_iter=max_iter, tol=tol, random_state=seed
    )
    model.fit(features, labels)
    return LinearModel(model.coef_, model.intercept_, model.classes_, n_iter=int(np.max(model.n_iter_)))


def fit_torch_lbfgs(
    features: np.ndarray,
    labels: np.ndarray,
    C: float,
    max_iter: int = 1000,
    tol: float = 1e-4,
    device: str = "auto",
    dtype: torch.dtype = torch.float32,
) -> LinearModel:
    """Full-batch L-BFGS on mean CE + ‖W‖²/(2CN) (= scikit-learn's C·ΣCE + ½‖W‖², divided by C·N)."""
    classes, targets = np.unique(labels, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"need at least 2 classes to fit, got {len(classes)}")
    device_obj = resolve_device(device)
    x = torch.tensor(np.asarray(features), dtype=dtype, device=device_obj)
    y = torch.as_tensor(targets, device=device_obj)
    outputs = 1 if len(classes) == 2 else len(classes)
    weight = torch.zeros(x.shape[1], outputs, dtype=dtype, device=device_obj, requires_grad=True)
    bias = torch.zeros(outputs, dtype=dtype, device=device_obj, requires_grad=True)
    l2 = 1.0 / (C * len(x))
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1,
        max_iter=max_iter,
        max_eval=15000,  # scipy's default maxfun, which scikit-learn keeps
        tolerance_grad=tol,
        tolerance_change=1e-12,
        history_size=10,
        line_search_fn="strong_wolfe",
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        logits = x @ weight + bias
        if outputs == 1:
            loss = F.binary_cross_entropy_with_logits(logits[:, 0], y.to(dtype))
        else:
            loss = F.cross_entropy(logits, y)
        loss = loss + 0.5 * l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    n_iter = int(optimizer.state[optimizer._params[0]].get("n_iter", 0))
    coef = weight.detach().T.double().cpu().numpy()
    return LinearModel(coef, bias.detach().double().cpu().numpy(), classes, n_iter=n_iter)


def fit_prototype(features: np.ndarray, labels: np.ndarray) -> LinearModel:
    """Class means of L2-normalised features, L2-normalised, used as classifier weights."""
    features = np.asarray(features, dtype=np.float64)
    features = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    classes, targets = np.unique(labels, return_inverse=True)
    means = np.zeros((len(classes), features.shape[1]))
    np.add.at(means, targets, features)
    means /= np.maximum(np.linalg.norm(means, axis=1, keepdims=True), 1e-12)
    return LinearModel(means, np.zeros(len(classes)), classes, normalize=True)


def sweep_c(
    fit: Callable[[np.ndarray, np.ndarray, float], LinearModel],
    train_x: np.ndarray,
    train_y: np.ndarray,
    val_x: np.ndarray,
    val_y: np.ndarray,
    grid: Sequence[float],
    refine_steps: int,
) -> tuple[float, list[dict[str, float]]]:
    """Best C by validation top-1 (ties: lower validation CE, then smaller C); refine by halving decades."""
    results: dict[float, tuple[float, float]] = {}

    def evaluate(c: float) -> None:
        if c not in results:
            model = fit(train_x, train_y, c)
            results[c] = (topk_accuracy(model, val_x, val_y, 1), mean_cross_entropy(model, val_x, val_y))
            logger.info("C=%.3g: val top-1 %.4f, val CE %.4f", c, *results[c])

    def best() -> float:
        return min(results, key=lambda c: (-results[c][0], results[c][1], c))

    for c in grid:
        evaluate(float(c))
    logs = np.log10(sorted(results))
    step = float(np.min(np.diff(logs))) / 2 if len(logs) > 1 else 1.0
    for _ in range(refine_steps):
        center = best()
        for sign in (-1, 1):
            evaluate(float(10 ** (np.log10(center) + sign * step)))
        step /= 2
    history = [{"C": c, "val_top1": acc, "val_ce": ce} for c, (acc, ce) in sorted(results.items())]
    return best(), history


def run_linear_probe(
    train_x: np.ndarray,
    train_y: np.ndarray,
    eval_x: np.ndarray,
    eval_y: np.ndarray,
    config: LinearProbeConfig = LinearProbeConfig(),
) -> list[dict[str, Any]]:
    """One result row per method: top-1/top-5 on the evaluation split, the chosen C and the sweep."""
    train_x, eval_x = np.asarray(train_x, dtype=np.float32), np.asarray(eval_x, dtype=np.float32)
    train_y, eval_y = np.asarray(train_y), np.asarray(eval_y)
    if len(train_x) != len(train_y) or len(eval_x) != len(eval_y):
        raise ValueError(
            f"features and labels differ in length: train {len(train_x)}/{len(train_y)}, eval {len(eval_x)}/{len(eval_y)}"
        )
    fits: dict[str, Callable[[np.ndarray, np.ndarray, float], LinearModel]] = {
        "logreg": lambda x, y, c: fit_logreg(x, y, c, config.max_iter, config.tol, config.seed),
        "torch_lbfgs": lambda x, y, c: fit_torch_lbfgs(x, y, c, config.max_iter, config.tol, config.device),
    }
    fit_part, val_part = carve_validation(train_y, config.val_fraction, config.seed)
    rows = []
    for method in config.methods:
        started = time.perf_counter()
        row: dict[str, Any] = {"method": method}
        if method == "prototype":
            model = fit_prototype(train_x, train_y)
            row.update(C=None, val_top1=None, sweep=[])
        else:
            best_c, history = sweep_c(
                fits[method],
                train_x[fit_part],
                train_y[fit_part],
                train_x[val_part],
                train_y[val_part],
                config.c_grid,
                config.refine_steps,
            )
            model = fits[method](train_x, train_y, best_c)
            val_top1 = next(h["val_top1"] for h in history if h["C"] == best_c)
            row.update(C=best_c, val_top1=val_top1, sweep=history, n_iter=model.n_iter)
        row.update(
            top1=topk_accuracy(model, eval_x, eval_y, 1),
            top5=topk_accuracy(model, eval_x, eval_y, 5),
            n_train=len(train_x),
            n_eval=len(eval_x),
            n_classes=len(model.classes),
            dim=train_x.shape[1],
            seconds=round(time.perf_counter() - started, 3),
        )
        logger.info("%s: top-1 %.4f top-5 %.4f (C=%s)", method, row["top1"], row["top5"], row["C"])
        rows.append(row)
    return rows


def align_eval_labels(train: ImageSource, evaluation: ImageSource) -> np.ndarray:
    """Evaluation labels in the training label space (matched by class name when both have names)."""
    if evaluation.labels is None or train.labels is None:
        raise ValueError(f"{train.name} / {evaluation.name}: both splits need labels for a linear probe")
    if train.class_names is None or evaluation.class_names is None:
        return evaluation.labels
    index = {name: i for i, name in enumerate(train.class_names)}
    missing = sorted(set(evaluation.class_names) - set(index))
    if missing:
        raise ValueError(f"{evaluation.name}: classes absent from {train.name}: {missing[:10]}")
    return np.array([index[name] for name in evaluation.class_names])[evaluation.labels]


def options_for(spec: EncoderSpec, options: FeatureOptions) -> FeatureOptions:
    """`options` for one encoder: an encoder without a projector (a tower-only "original" export or a plain
    HF directory) is probed at its other feature points, with a warning; with none left it is an error."""
    if "projector" not in options.feature_points or spec.projector_dir is not None:
        return options
    points = tuple(p for p in options.feature_points if p != "projector")
    if not points:
        raise ValueError(f"{spec.path}: has no projector/, and --feature_points asks for the projector only")
    logger.warning("%s: no projector/, so no projector rows; probing %s only", spec.path, ", ".join(points))
    return replace(options, feature_points=points)


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Markdown table of the result rows (percent)."""
    lines = [
        "| run | feature point | pooling | method | top-1 | top-5 | C |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c = "–" if row["C"] is None else f"{row['C']:.3g}"
        lines.append(
            f"| {row['run']} | {row['feature_point']} | {row['pooling']} | {row['method']} | "
            f"{100 * row['top1']:.2f} | {100 * row['top5']:.2f} | {c} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--encoders", nargs="+", required=True, help="exported encoder dirs (or HF vision-model dirs)"
    )
    parser.add_argument(
        "--run_names",
        "--run-names",
        nargs="*",
        default=None,
        help="row labels, one per encoder (default: dir names)",
    )
    parser.add_argument(
        "--train_data",
        "--train-data",
        required=True,
        help="training images: ImageFolder root or datasets dir",
    )
    parser.add_argument("--eval_data", "--eval-data", required=True, help="evaluation images (same format)")
    parser.add_argument(
        "--data_format",
        "--data-format",
        choices=["imagefolder", "hf"],
        default="imagefolder",
        help="layout of the data dirs",
    )
    parser.add_argument(
        "--train_split",
        "--train-split",
        default=None,
        help="split sub-folder / DatasetDict split of --train_data",
    )
    parser.add_argument(
        "--eval_split",
        "--eval-split",
        default=None,
        help="split sub-folder / DatasetDict split of --eval_data",
    )
    parser.add_argument(
        "--train_subset",
        "--train-subset",
        type=int,
        default=None,
        help="seeded random training subset (paper: 50000)",
    )
    parser.add_argument(
        "--eval_subset", "--eval-subset", type=int, default=None, help="seeded random evaluation subset"
    )
    parser.add_argument(
        "--feature_points",
        "--feature-points",
        nargs="+",
        default=["encoder", "projector"],
        choices=["encoder", "projector"],
        help="feature points",
    )
    parser.add_argument(
        "--pooling", nargs="+", default=["mean"], choices=["mean", "cls"], help="token pooling(s)"
    )
    parser.add_argument(
        "--layers", nargs="*", type=int, default=[], help="extra encoder hidden-state indices to probe"
    )
    parser.add_argument(
        "--methods", nargs="+", default=["logreg", "prototype"], choices=METHODS, help="probe methods"
    )
    parser.add_argument(
        "--c_grid", "--c-grid", nargs="+", type=float, default=list(DEFAULT_C_GRID), help="coarse C grid"
    )
    parser.add_argument(
        "--refine_steps",
        "--refine-steps",
        type=int,
        default=3,
        help="C refinement rounds around the best value",
    )
    parser.add_argument(
        "--val_fraction",
        "--val-fraction",
        type=float,
        default=0.2,
        help="share of training data held out to pick C",
    )
    parser.add_argument("--max_iter", "--max-iter", type=int, default=1000, help="solver iterations")
    parser.add_argument("--seed", type=int, default=0, help="seed for subsets and the validation split")
    parser.add_argument("--out", required=True, help="results JSON (kind linear_probe, docs/CONTRACTS.md §4)")
    parser.add_argument("--table", default=None, help="also write a Markdown table here")
    parser.add_argument(
        "--batch_size", "--batch-size", type=int, default=64, help="images per encoder forward pass"
    )
    parser.add_argument(
        "--num_workers", "--num-workers", type=int, default=0, help="DataLoader workers decoding images"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:0, ...")
    parser.add_argument(
        "--cache_dir", "--cache-dir", default=str(DEFAULT_CACHE_DIR), help="feature cache root"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = args.run_names or [Path(e).name for e in args.encoders]
    if len(names) != len(args.encoders) or len(set(names)) != len(names):
        raise SystemExit(f"run names {names} must be unique, one per encoder; pass --run_names")
    config = LinearProbeConfig(
        tuple(args.methods),
        tuple(args.c_grid),
        args.refine_steps,
        args.val_fraction,
        args.max_iter,
        seed=args.seed,
        device=args.device,
    )
    train = image_source_from_args(args.train_data, args.data_format, args.train_split)
    evaluation = image_source_from_args(args.eval_data, args.data_format, args.eval_split)
    if args.train_subset:
        train = train.subset(random_subset(len(train), args.train_subset, args.seed))
    if args.eval_subset:
        evaluation = evaluation.subset(random_subset(len(evaluation), args.eval_subset, args.seed))
    eval_labels = align_eval_labels(train, evaluation)
    options = FeatureOptions(
        tuple(args.feature_points), tuple(args.pooling), tuple(args.layers), args.batch_size, args.num_workers
    )
    rows = []
    for encoder, run in zip(args.encoders, names):
        spec = read_encoder_spec(encoder)
        encoder_options = options_for(spec, options)
        train_features = extract_features(spec, train, encoder_options, args.cache_dir, args.device)
        eval_features = extract_features(spec, evaluation, encoder_options, args.cache_dir, args.device)
        for point, pooling, layer in encoder_options.targets():
            name = feature_name(point, pooling, layer)
            labels = {k: v for k, v in spec.run_labels.items() if k != "run"}
            logger.info("%s %s: probing", run, name)
            for row in run_linear_probe(
                train_features[name], train.labels, eval_features[name], eval_labels, config
            ):
                rows.append(
                    {
                        "run": run,
                        **labels,
                        "feature_point": point,
                        "pooling": pooling,
                        "layer": layer,
                        "seed": args.seed,
                        **row,
                    }
                )
    settings = {
        **asdict(config),
        "train_data": args.train_data,
        "eval_data": args.eval_data,
        "train_subset": args.train_subset,
        "eval_subset": args.eval_subset,
        "encoders": args.encoders,
        "feature_options": asdict(options),
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"kind": "linear_probe", "settings": settings, "rows": rows}, indent=1)
    )
    table = format_table(rows)
    if args.table:
        Path(args.table).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
