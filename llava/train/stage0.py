"""Stage 0: pretrain a tiny vision tower on the synthetic world (stands in for SigLIP's pretraining).

The paper's encoders arrive pretrained (SigLIP2, CLIP, DINOv2, ...); the offline tiny towers of
:mod:`llava.tiny` are random. Without a pretrained tower the miniature's Stage 1 cannot ground answers
in the image (issue 14: colour VQA 19 % vs 58 % with Stage 0). This module trains the tower with a
multi-label objective on the world's scenes: which colours are present, which shapes are present and
how many objects there are (BCE on a linear head over the mean-pooled tokens of the layer the projector
reads, ``hidden_states[select_layer]``, as SigLIP has no CLS token). The head is discarded; the tower
is saved with its image processor as a normal HF vision model directory that ``--vision_tower`` (and
``VISION_MODEL_VERSION`` of scripts/train/stage1_proj.sh) loads.

Run: ``python -m llava.train.stage0 --vision_tower TINY/siglip --world WORLD --output_dir OUT``.
Threads: ``--threads`` (default: torch's, which follows ``$OMP_NUM_THREADS``; see :func:`set_threads`).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import transformers
from PIL import Image

from llava.data.synthetic_scene import COLOURS, SHAPES, scene_from_dict

logger = logging.getLogger(__name__)


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads to ``threads`` (None: keep torch's default, i.e. ``$OMP_NUM_THREADS``).

    Returns the thread count in effect. scripts/demo.sh sets one thread per process: tiny models gain
    little from a second one and lose several-fold when a thread waits for a core another process holds
    (docs/DECISIONS.md, "Threads").
    """
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)
    return torch.get_num_threads()


@dataclass(frozen=True)
class Stage0Config:
    """What :func:`pretrain_tower` does; validated on creation."""

    vision_tower: str
    world: str
    output_dir: str
    steps: int = 600
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.03
    select_layer: int = -2
    max_objects: int = 4
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError(f"steps and batch_size must be >= 1, got {self.steps}, {self.batch_size}")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction must be in [0, 1), got {self.warmup_fraction}")
        if self.max_objects < 1:
            raise ValueError(f"max_objects must be >= 1, got {self.max_objects}")
        if not (Path(self.world) / "scenes.jsonl").is_file():
            raise FileNotFoundError(
                f"{self.world}/scenes.jsonl does not exist; write a world with python -m llava.data.synthetic"
            )


def scene_targets(scene: dict, max_objects: int) -> np.ndarray:
    """Multi-hot target of a ``scenes.jsonl`` scene: colours present, shapes present, object count (one-hot)."""
    objects = scene["objects"]
    if not 1 <= len(objects) <= max_objects:
        raise ValueError(f"scene has {len(objects)} objects; max_objects={max_objects}")
    target = np.zeros(len(COLOURS) + len(SHAPES) + max_objects, dtype=np.float32)
    for obj in objects:
        target[list(COLOURS).index(obj["colour"])] = 1
        target[len(COLOURS) + SHAPES.index(obj["shape"])] = 1
    target[len(COLOURS) + len(SHAPES) + len(objects) - 1] = 1
    return target


def load_split(world: Path, split: str, processor, max_objects: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel values ``[N, 3, H, W]`` and targets ``[N, K]`` of one world split (``train`` or ``val``)."""
    rows = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["split"] == split]
    if not rows:
        raise ValueError(f"{world}/scenes.jsonl has no scene of split {split!r}")
    images = [Image.open(world / "images" / split / f"{row['id']}.png").convert("RGB") for row in rows]
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    for row in rows:
        scene_from_dict(row["scene"])  # a malformed line fails here, naming its fields
    targets = torch.from_numpy(np.stack([scene_targets(row["scene"], max_objects) for row in rows]))
    return pixels, targets


def pooled_features(tower: torch.nn.Module, pixels: torch.Tensor, select_layer: int) -> torch.Tensor:
    """Mean over tokens of ``hidden_states[select_layer]`` (the features the LLaVA projector reads)."""
    hidden = tower(pixel_values=pixels, output_hidden_states=True).hidden_states[select_layer]
    return hidden.mean(dim=1)


def _lr_at(step: int, config: Stage0Config) -> float:
    warmup = max(1, round(config.warmup_fraction * config.steps))
    if step < warmup:
        return config.learning_rate * (step + 1) / warmup
    progress = (step - warmup) / max(1, config.steps - warmup)
    return config.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def pretrain_tower(config: Stage0Config) -> dict:
    """Train the tower, save it to ``config.output_dir`` and return the log (also ``stage0_log.json``)."""
    torch.manual_seed(config.seed)
    world, out = Path(config.world), Path(config.output_dir)
    tower = transformers.AutoModel.from_pretrained(config.vision_tower)
    processor = transformers.AutoImageProcessor.from_pretrained(config.vision_tower)
    pixels, targets = load_split(world, "train", processor, config.max_objects)
    head = torch.nn.Linear(tower.config.hidden_size, targets.shape[1])
    params = [*tower.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    generator = torch.Generator().manual_seed(config.seed)
    tower.train()
    losses: list[float] = []
    began = time.perf_counter()
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = _lr_at(step, config)
        index = torch.randint(len(pixels), (config.batch_size,), generator=generator)
        logits = head(pooled_features(tower, pixels[index], config.select_layer))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, targets[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if config.log_every and (step + 1) % config.log_every == 0:
            recent = sum(losses[-config.log_every :]) / config.log_every
            logger.info("step %d/%d loss %.4f", step + 1, config.steps, recent)
    log = {
        "steps": config.steps,
        "first_loss": losses[0],
        "last_loss": float(np.mean(losses[-max(1, config.steps // 20) :])),
        "losses": losses,
        "train_seconds": round(time.perf_counter() - began, 2),
        "threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(config).items()},
    }
    tower.eval()
    out.mkdir(parents=True, exist_ok=True)
    tower.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "stage0_log.json").write_text(json.dumps(log, indent=2) + "\n")
    return log


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vision_tower", required=True, help="HF vision model directory to start from")
    parser.add_argument("--world", required=True, help="synthetic world (python -m llava.data.synthetic)")
    parser.add_argument("--output_dir", required=True, help="where the pretrained tower is saved")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps")
    parser.add_argument(
        "--batch_size", type=int, default=64, help="images per step (sampled with replacement)"
    )
    parser.add_argument(
        "--learning_rate", type=float, default=1e-3, help="peak AdamW LR (cosine, warmup 3 %%)"
    )
    parser.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay")
    parser.add_argument("--select_layer", type=int, default=-2, help="hidden state the projector reads")
    parser.add_argument("--max_objects", type=int, default=4, help="most objects per scene (count classes)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the head and the batch order")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: $OMP_NUM_THREADS)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    threads = set_threads(args.threads)
    config = Stage0Config(
        vision_tower=args.vision_tower,
        world=args.world,
        output_dir=args.output_dir,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        weight_decay=args.weight_decay,
        select_layer=args.select_layer,
        max_objects=args.max_objects,
        seed=args.seed,
    )
    log = pretrain_tower(config)
    logger.info(
        "stage 0 done (%d threads): loss %.4f -> %.4f in %.1f s; saved to %s",
        threads,
        log["first_loss"],
        log["last_loss"],
        log["train_seconds"],
        config.output_dir,
    )


if __name__ == "__main__":
    main()
