"""Segmentation probe on frozen patch tokens (patch-seg protocol, ADE20K; Covert et al. 2024, DESIGN §5).

Data: the ADE20K layout `images/{training,validation}/<id>.jpg` + `annotations/{training,validation}/<id>.png`
(uint8 class index per pixel, 151 classes, 0 = unlabeled). Images and masks get the largest centred square
crop and a resize to the encoder's input (bicubic/processor resample for images, nearest for masks).
Labels are multi-hot "union" patch labels (analysis/seg_labels.py).

Head: Linear(d→1024) → GELU → Linear(→151) per token, BCE-with-logits, AdamW (lr 1e-3, wd 0.01),
batch 32 images, 5 epochs, and patch-seg's schedule exactly: timm's `CosineLRScheduler(t_initial=all
steps, lr_min=1e-4, warmup_t=500, t_in_epochs=False)` (so `warmup_prefix=False`, `warmup_lr_init=0`):
LR 0 at the first step, a linear warmup over 500 steps, and one cosine from the peak to 1e-4 over all
steps counted from step 0 (the warmup's steps included, so the cosine does not restart after warmup). Features are extracted once and cached (analysis/features.py), so
training heads for several seeds costs little more than one. Reported metrics are those after the last
epoch (patch-seg keeps the best epoch on the validation split; per-epoch recall is stored as well).
All images are used each epoch (the last batch may be smaller). `max_train_images` (CLI
`--max_train_images`, default all) trains on a seeded subset of the training split instead, the same
images for every encoder and head seed (SUBSET_SEED): a size choice for small runs, e.g. the CPU
miniature (scripts/demo.sh), where the per-token head (d→1024→C over every patch of every image,
5 epochs) dominates: ~19 CPU s per head seed on 2,000 images of 64 patches of 64-d tokens; the metric (macro recall on the whole
validation split) is unchanged. `--first_seed` numbers the head seeds first_seed…first_seed+N−1, so
repeated probes of one encoder (once per training seed in the demo) draw new heads, not copies.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from analysis.features import (
    DEFAULT_CACHE_DIR,
    EncoderSpec,
    FeatureOptions,
    extract_features,
    feature_name,
    load_processor,
    patch_grid,
    processed_size,
    read_encoder_spec,
    resolve_device,
)
from analysis.image_sources import IMAGE_EXTENSIONS, center_square_crop, file_list_source, stable_hash
from analysis.seg_labels import (
    PatchCounts,
    class_palette,
    colorize,
    load_mask,
    pack_labels,
    patch_map_to_pixels,
    patch_metrics,
    union_patch_labels,
    unpack_labels,
)

logger = logging.getLogger(__name__)

SUBSET_SEED = 0
"""Seed of the training-image subset under `max_train_images` (fixed: every encoder sees the same images)."""
METRICS = ("recall", "micro_accuracy", "precision", "precision_predicted", "f1")


@dataclass(frozen=True)
class SegProbeConfig:
    num_classes: int = 151
    hidden_size: int = 1024
    lr: float = 1e-3
    min_lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 32
    epochs: int = 5
    warmup_steps: int = 500  # patch-seg's warmup_t
    threshold: float = 0.5
    device: str = "auto"
    max_train_images: int | None = None  # None: the whole training split (patch-seg); else a seeded subset

    def __post_init__(self) -> None:
        if self.max_train_images is not None and self.max_train_images < 1:
            raise ValueError(
                f"SegProbeConfig: max_train_images must be ≥ 1 or None, got {self.max_train_images}"
            )
        if self.num_classes < 2 or self.hidden_size < 1 or self.batch_size < 1 or self.epochs < 1:
            raise ValueError("SegProbeConfig: num_classes ≥ 2, hidden_size, batch_size and epochs ≥ 1")
        if self.warmup_steps < 0 or not 0 < self.threshold < 1:
            raise ValueError("SegProbeConfig: warmup_steps >= 0 and threshold in (0, 1)")
        if not 0 <= self.min_lr <= self.lr or self.lr <= 0:
            raise ValueError(f"SegProbeConfig: need 0 ≤ min_lr ({self.min_lr}) ≤ lr ({self.lr}) and lr > 0")


class SegHead(torch.nn.Module):
    """Per-token 2-layer MLP (patch-seg `MLP`): Linear → GELU → Linear."""

    def __init__(self, in_features: int, hidden_size: int, num_classes: int) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(in_features, hidden_size)
        self.gelu = torch.nn.GELU()
        self.fc2 = torch.nn.Linear(hidden_size, num_classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.gelu(self.fc1(tokens)))


def patchseg_lr(step: int, total_steps: int, lr: float, min_lr: float, warmup_steps: int) -> float:
    """LR of optimizer step `step` (0-based) under timm's CosineLRScheduler as patch-seg configures it.

    `t_initial=total_steps, lr_min=min_lr, warmup_t=warmup_steps, warmup_lr_init=0, warmup_prefix=False`,
    stepped per update: warmup `step · lr / warmup_steps`, then `min_lr + (lr - min_lr)(1 + cos(π step /
    total_steps)) / 2`, and `min_lr` from `total_steps` on (timm's cycle limit of 1).
    """
    if step < warmup_steps:
        return step * lr / warmup_steps
    if step >= total_steps:
        return min_lr
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * step / total_steps))


def _batch(
    tokens: np.ndarray, labels: np.ndarray, index: np.ndarray, num_classes: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    index = np.sort(index)  # monotone reads from memory-mapped caches
    x = torch.from_numpy(np.asarray(tokens[index], dtype=np.float32)).to(device)
    y = labels[index] if labels.dtype == bool else unpack_labels(labels[index], num_classes)
    return x, torch.from_numpy(y).to(device)


def _check(tokens: np.ndarray, labels: np.ndarray, num_classes: int, what: str) -> None:
    width = num_classes if labels.dtype == bool else math.ceil(num_classes / 8)
    if labels.shape != (*tokens.shape[:2], width):
        raise ValueError(
            f"{what}: tokens {tokens.shape} and labels {labels.shape} disagree (classes {num_classes})"
        )


def train_seg_head(
    tokens: np.ndarray,
    labels: np.ndarray,
    config: SegProbeConfig,
    seed: int,
    eval_set: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[SegHead, list[float]]:
    """Train a head on tokens [N, T, D] and labels [N, T, C] (bool, or bit-packed uint8).

    Returns the head and, when `eval_set` is given, the macro recall after each epoch.
    """
    _check(tokens, labels, config.num_classes, "train")
    device = resolve_device(config.device)
    torch.manual_seed(seed)
    head = SegHead(tokens.shape[-1], config.hidden_size, config.num_classes).to(device)
    optimizer = torch.optim.AdamW(head.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    steps_per_epoch = math.ceil(len(tokens) / config.batch_size)
    total = steps_per_epoch * config.epochs
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: patchseg_lr(step, total, config.lr, config.min_lr, config.warmup_steps) / config.lr,
    )
    order_rng = np.random.default_rng(seed)
    epoch_recall: list[float] = []
    for epoch in range(config.epochs):
        head.train()
        permutation = order_rng.permutation(len(tokens))
        for start in range(0, len(tokens), config.batch_size):
            x, y = _batch(
                tokens, labels, permutation[start : start + config.batch_size], config.num_classes, device
            )
            loss = F.binary_cross_entropy_with_logits(head(x), y.float())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
        logger.info("seed %d epoch %d: last batch loss %.5f", seed, epoch, loss.item())
        if eval_set is not None:
            epoch_recall.append(evaluate_seg_head(head, *eval_set, config)["recall"])
    return head, epoch_recall


@torch.no_grad()
def predict_probabilities(head: SegHead, tokens: np.ndarray, index: np.ndarray) -> np.ndarray:
    device = next(head.parameters()).device
    x = torch.from_numpy(np.asarray(tokens[index], dtype=np.float32)).to(device)
    return torch.sigmoid(head.eval()(x)).cpu().numpy()


@torch.no_grad()
def evaluate_seg_head(
    head: SegHead, tokens: np.ndarray, labels: np.ndarray, config: SegProbeConfig
) -> dict[str, float]:
    """Patch metrics (analysis/seg_labels.py) of sigmoid > threshold predictions."""
    _check(tokens, labels, config.num_classes, "eval")
    head.eval()
    device = next(head.parameters()).device
    counts = PatchCounts.zeros(config.num_classes)
    for start in range(0, len(tokens), config.batch_size):
        x, y = _batch(
            tokens,
            labels,
            np.arange(start, min(start + config.batch_size, len(tokens))),
            config.num_classes,
            device,
        )
        counts.update(torch.sigmoid(head(x)) > config.threshold, y)
    return patch_metrics(counts)


# ------------------------------------------------------------------------------------------------ data
def ade20k_split(root: str | Path, split: str) -> tuple[list[Path], list[Path]]:
    """Paired (image, annotation) paths of an ADE20K-layout split ("training" or "validation")."""
    root = Path(root)
    image_dir, annotation_dir = root / "images" / split, root / "annotations" / split
    for directory in (image_dir, annotation_dir):
        if not directory.is_dir():
            raise FileNotFoundError(
                f"{directory}: missing (ADE20K layout: images/{split}, annotations/{split})"
            )
    images = sorted(p for p in image_dir.iterdir() if p.is_file())
    annotations = {p.stem: p for p in annotation_dir.iterdir() if p.is_file()}
    strays = [p.name for p in images if p.suffix.lower() not in IMAGE_EXTENSIONS]
    strays += [p.name for p in annotations.values() if p.suffix.lower() != ".png"]
    if strays:
        raise ValueError(f"{root}/{split}: files that are neither images nor .png annotations: {strays[:5]}")
    unpaired = [p.name for p in images if p.stem not in annotations]
    orphans = sorted(set(annotations) - {p.stem for p in images})
    if unpaired or orphans:
        raise ValueError(
            f"{root}/{split}: images without annotation {unpaired[:5]}, annotations without image {orphans[:5]}"
        )
    if not images:
        raise ValueError(f"{image_dir}: no images")
    return images, [annotations[p.stem] for p in images]


def patch_labels_for_split(
    annotations: Sequence[Path],
    size: tuple[int, int],
    grid: tuple[int, int],
    num_classes: int,
    cache_dir: str | Path | None,
    chunk: int = 64,
) -> np.ndarray:
    """Bit-packed union labels [N, gh*gw, ceil(C/8)] of every annotation, cached like features."""
    stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in annotations]
    key = stable_hash({"annotations": stats, "size": size, "grid": grid, "num_classes": num_classes})
    cache_file = None if cache_dir is None else Path(cache_dir) / "seg_labels" / f"{key}.npy"
    if cache_file is not None and cache_file.is_file():
        return np.load(cache_file)
    packed = []
    for start in range(0, len(annotations), chunk):
        masks = np.stack([load_mask(p, size, num_classes) for p in annotations[start : start + chunk]])
        packed.append(pack_labels(union_patch_labels(masks, grid, num_classes)))
    labels = np.concatenate(packed)
    if cache_file is not None:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        np.save(cache_file.with_suffix(".tmp.npy"), labels)
        cache_file.with_suffix(".tmp.npy").replace(cache_file)
    return labels


def write_qualitative(
    head: SegHead,
    tokens: np.ndarray,
    images: Sequence[Path],
    annotations: Sequence[Path],
    size: tuple[int, int],
    grid: tuple[int, int],
    num_classes: int,
    out_dir: Path,
) -> list[Path]:
    """PNG panels image | ground truth | prediction (per-patch most probable class), fixed palette."""
    out_dir.mkdir(parents=True, exist_ok=True)
    palette = class_palette(num_classes)
    probabilities = predict_probabilities(head, tokens, np.arange(len(images)))
    written = []
    for i, (image_path, annotation_path) in enumerate(zip(images, annotations)):
        with Image.open(image_path) as image:
            picture = np.asarray(
                center_square_crop(image.convert("RGB")).resize((size[1], size[0]), Image.BICUBIC)
            )
        truth = colorize(load_mask(annotation_path, size, num_classes), palette)
        predicted = colorize(patch_map_to_pixels(probabilities[i].argmax(-1), grid, size), palette)
        gap = np.full((size[0], 4, 3), 255, dtype=np.uint8)
        path = out_dir / f"{image_path.stem}.png"
        Image.fromarray(np.concatenate([picture, gap, truth, gap, predicted], axis=1)).save(path)
        written.append(path)
    return written


def training_subset(
    images: Sequence[Path], annotations: Sequence[Path], size: int
) -> tuple[list[Path], list[Path]]:
    """A seeded uniform subset (SUBSET_SEED, file order kept) of `size` training pairs; all if fewer."""
    if size >= len(images):
        return list(images), list(annotations)
    keep = np.sort(np.random.default_rng(SUBSET_SEED).choice(len(images), size=size, replace=False))
    return [images[i] for i in keep], [annotations[i] for i in keep]


# ------------------------------------------------------------------------------------------------- runs
def summarize(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std (ddof 1; 0 for one seed), n}} over seed rows."""
    summary = {}
    for metric in METRICS:
        values = np.array([row[metric] for row in rows], dtype=float)
        std = float(values.std(ddof=1)) if len(values) > 1 else 0.0
        summary[metric] = {"mean": float(values.mean()), "std": std, "n": len(values)}
    return summary


def run_seg_probe(
    encoder: str | Path | EncoderSpec,
    data_root: str | Path,
    config: SegProbeConfig = SegProbeConfig(),
    seeds: Sequence[int] = (0,),
    feature_point: str = "encoder",
    cache_dir: str | Path | None = DEFAULT_CACHE_DIR,
    png_dir: str | Path | None = None,
    n_qualitative: int = 8,
    feature_batch_size: int = 64,
    run_name: str | None = None,
) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """Seg-probe one encoder on an ADE20K-layout root; returns the per-seed rows and their summary."""
    spec = encoder if isinstance(encoder, EncoderSpec) else read_encoder_spec(encoder)
    run = run_name or spec.run_labels["run"]
    size = processed_size(load_processor(spec))
    grid = patch_grid(spec, size)
    options = FeatureOptions((feature_point,), ("tokens",), batch_size=feature_batch_size)
    name = feature_name(feature_point, "tokens")
    splits = {}
    for split in ("training", "validation"):
        images, annotations = ade20k_split(data_root, split)
        if split == "training" and config.max_train_images is not None:
            images, annotations = training_subset(images, annotations, config.max_train_images)
        source = file_list_source(images, name=f"{data_root}:{split}").with_square_crop()
        tokens = extract_features(spec, source, options, cache_dir, config.device)[name]
        labels = patch_labels_for_split(annotations, size, grid, config.num_classes, cache_dir)
        splits[split] = (tokens, labels, images, annotations)
    train_tokens, train_labels = splits["training"][:2]
    val_tokens, val_labels, val_images, val_annotations = splits["validation"]
    rows = []
    for seed in seeds:
        head, epoch_recall = train_seg_head(
            train_tokens, train_labels, config, seed, (val_tokens, val_labels)
        )
        metrics = evaluate_seg_head(head, val_tokens, val_labels, config)
        labels = {k: v for k, v in spec.run_labels.items() if k != "run"}
        rows.append(
            {
                "run": run,
                **labels,
                "feature_point": feature_point,
                "seed": seed,
                **metrics,
                "epoch_recall": epoch_recall,
                "n_train": len(train_tokens),
                "n_eval": len(val_tokens),
                "grid": list(grid),
                "image_size": list(size),
            }
        )
        logger.info("%s seed %d: %s", run, seed, {m: round(metrics[m], 4) for m in METRICS})
        if png_dir is not None and seed == seeds[0] and n_qualitative > 0:
            n = min(n_qualitative, len(val_images))
            write_qualitative(
                head,
                val_tokens[:n],
                val_images[:n],
                val_annotations[:n],
                size,
                grid,
                config.num_classes,
                Path(png_dir) / run,
            )
    return rows, summarize(rows)


def format_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown table: one line per run, mean ± std per metric (percent)."""
    lines = ["| run | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for run, metrics in summary.items():
        cells = [f"{100 * metrics[m]['mean']:.2f} ± {100 * metrics[m]['std']:.2f}" for m in METRICS]
        lines.append(f"| {run} | " + " | ".join(cells) + " |")
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
        "--data", required=True, help="ADE20K-layout root (images/ and annotations/{training,validation})"
    )
    parser.add_argument("--out", required=True, help="results JSON (kind seg_probe, docs/CONTRACTS.md §4)")
    parser.add_argument("--table", default=None, help="also write a Markdown table here")
    parser.add_argument(
        "--png_dir", "--png-dir", default=None, help="qualitative PNGs (image | truth | prediction) go here"
    )
    parser.add_argument(
        "--num_qualitative",
        "--n_qualitative",
        "--n-qualitative",
        dest="n_qualitative",
        type=int,
        default=8,
        help="validation images drawn per encoder",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=6,
        help="number of head seeds (first_seed..first_seed+N-1); mean ± std reported",
    )
    parser.add_argument(
        "--first_seed", type=int, default=0, help="first head seed (repeated probes: draw new heads)"
    )
    parser.add_argument(
        "--max_train_images",
        type=int,
        default=None,
        help="train heads on a seeded subset of this many training images (default: all, patch-seg)",
    )
    parser.add_argument(
        "--feature_point",
        "--feature-point",
        choices=["encoder", "projector"],
        default="encoder",
        help="which tokens to probe",
    )
    parser.add_argument(
        "--num_classes",
        "--num-classes",
        type=int,
        default=151,
        help="classes incl. 0 = unlabeled (ADE20K: 151)",
    )
    parser.add_argument("--epochs", type=int, default=5, help="training epochs")
    parser.add_argument("--batch_size", "--batch-size", type=int, default=32, help="images per head update")
    parser.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate")
    parser.add_argument(
        "--weight_decay", "--weight-decay", type=float, default=0.01, help="AdamW weight decay"
    )
    parser.add_argument(
        "--warmup_steps",
        "--warmup-steps",
        type=int,
        default=500,
        help="linear warmup steps of the cosine (patch-seg: 500)",
    )
    parser.add_argument(
        "--feature_batch_size",
        "--feature-batch-size",
        type=int,
        default=64,
        help="images per encoder forward pass",
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda:0, ...")
    parser.add_argument(
        "--cache_dir", "--cache-dir", default=str(DEFAULT_CACHE_DIR), help="feature/label cache root"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    names = args.run_names or [Path(e).name for e in args.encoders]
    if len(names) != len(args.encoders) or len(set(names)) != len(names):
        raise SystemExit(f"run names {names} must be unique, one per encoder; pass --run_names")
    config = SegProbeConfig(
        num_classes=args.num_classes,
        lr=args.lr,
        weight_decay=args.weight_decay,
        batch_size=args.batch_size,
        epochs=args.epochs,
        warmup_steps=args.warmup_steps,
        device=args.device,
        max_train_images=args.max_train_images,
    )
    seeds = range(args.first_seed, args.first_seed + args.seeds)
    rows, summary = [], {}
    for encoder, run in zip(args.encoders, names):
        run_rows, summary[run] = run_seg_probe(
            encoder,
            args.data,
            config,
            seeds,
            args.feature_point,
            args.cache_dir,
            args.png_dir,
            args.n_qualitative,
            args.feature_batch_size,
            run,
        )
        rows += run_rows
    settings = {
        **asdict(config),
        "seeds": list(seeds),
        "feature_point": args.feature_point,
        "data": str(args.data),
        "encoders": args.encoders,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(
        json.dumps({"kind": "seg_probe", "settings": settings, "rows": rows, "summary": summary}, indent=1)
    )
    table = format_table(summary)
    if args.table:
        Path(args.table).write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
