"""Grad-CAM of the gradient the vision encoder receives under the SFT and DPO losses (paper Fig. 7).

Song et al. 2025 (arXiv 2510.16333, DESIGN §5): backward of the per-sample SFT or DPO loss of one
preference sample (image, query, chosen, rejected); the gradient w.r.t. the vision encoder's output
tokens A = Φ_ViT(I), i.e. the tower's selected hidden state after prefix dropping = the input of
``model.model.multi_modal_projector``. A forward pre-hook on the projector captures that tensor, so
every tower family, ensemble wrapper and both square and anyres models work unchanged. Per token
the map is the L2 norm of ∂L/∂A over channels, laid on the patch grid.

Losses are the trainer's (``llava.train.losses``, ``llava.train.logps``): SFT = token-mean NLL of the
chosen reply; DPO (and IPO, hinge, MPO) with the reference log-probs of the starting model (scored
once per sample before any update, in eval mode: the same numbers a frozen copy gives) or of a
cache file (``--ref_logps``, e.g. the training run's ``ref_logps.json``). GRPO (``--loss_types grpo``):
the clipped surrogate of a group sampled at each step, analysis.gradcam_grpo.

The paper's protocol (``steps``): train a fresh copy of the starting model on the single sample for
``max(steps)`` updates with the real optimizer (AdamW over ``build_param_groups``, weight decay 0,
gradients clipped at ``max_grad_norm``) and schedule (cosine, warmup ``ceil(0.03 * train_steps)``
steps, HF's rule), recording the map of the gradient computed at each listed step (step k = after k
updates). The warmup LR of the first update is 0, which is why the paper looks around step 20.
``steps = [0]`` is the plain one-backward analysis of the checkpoint. Weights are restored after each
(sample, loss) run.

Geometry (``analysis.gradcam_metrics.token_grid`` and ``map_extent``):
- square models: one ``grid x grid`` map (``config.pivot_grid``); a kept CLS token is dropped. The
  map covers the part of the image the processor keeps: the whole image for SigLIP (resized to the
  square, aspect not kept, so box coordinates scale per axis), the centre square for
  shortest-edge-resize + centre-crop processors (CLIP, DINOv2, MAE, ViT, ConvNeXt < 384).
- anyres (LLaVA-OneVision): the tile tokens are arranged into the tile mosaic exactly as
  ``pack_image_features`` does and cropped to the token window transformers' ``unpad_image`` keeps.
  That window's extent in the original image follows from the processor's aspect-preserving resize
  and centred padding onto the chosen tiling; it is the whole image, up to a token row/column of
  padding from HF's rounding. The base tile (the whole image squashed to one tile) is resampled onto
  the window's cells by area overlap, preserving its mass, and added: map = tiles + base.

Outputs of ``python -m analysis.gradcam`` (docs/CONTRACTS.md §4, kind ``gradcam``) in OUT_DIR:
``gradcam.json``; ``maps/<id>_<loss>.npy`` (``_step<k>`` appended when several steps are recorded);
``images/<id>.png`` (the region the map covers); ``overlays/<id>_<loss>[_step<k>].png``, each with a
colour bar in gradient units on a scale [0, max] shared by the loss types of a sample and step (so the
SFT, DPO and GRPO magnitudes compare directly); ``figures/<id>[_step<k>].png`` image | one map per loss
type (e.g. SFT | DPO | GRPO) drawn by ``analysis.plots.plot_gradcam_grid`` on that shared scale too,
without units. Ids are made file-safe (``/`` → ``_``). Rows carry ``id``, ``loss_type``, ``step``, ``loss``,
``learning_rate``, ``mass_in_box`` (null when the record has neither ``meta.box`` nor ``meta.mask``, a
mask image path), ``entropy``, ``map_npy``, ``image`` and ``grid``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PretrainedConfig, PreTrainedModel, get_cosine_schedule_with_warmup

from analysis import gradcam_grpo
from analysis import gradcam_metrics as gm
from analysis.gradcam_outputs import safe_name, write_sample_outputs
from llava.data.collator import DataCollator
from llava.data.dataset import MultimodalDataset
from llava.data.errors import RecordError
from llava.data.images import load_image
from llava.data.mixture import load_records
from llava.data.records import PreferenceRecord
from llava.model.builder import load_model
from llava.model.image_tokens import image_token_counter
from llava.model.model_dirs import require_llava_checkpoint
from llava.train.logps import chosen_logps, pair_logps
from llava.train.losses import LOSSES, LossConfig, PairStats
from llava.train.param_groups import build_param_groups, parse_tunable_parts, set_trainable_parts
from llava.train.reference import load_reference_logps, lookup

logger = logging.getLogger(__name__)

PAPER_LEARNING_RATES = {"sft": 5e-6, "dpo": 1e-6, gradcam_grpo.LOSS_TYPE: 1e-6}
"""Stage-2 learning rates of the paper (DESIGN §4; GRPO: scripts/train/grpo.sh); other preference losses
default to DPO's."""
LOSS_TYPES = (*LOSSES, gradcam_grpo.LOSS_TYPE)
"""The trainer's preference/SFT losses and GRPO (analysis.gradcam_grpo)."""
RefLogps = tuple[torch.Tensor, torch.Tensor]


@dataclass
class GradcamConfig:
    """What to compute per sample (defaults: the paper's Stage-2 recipe and Grad-CAM protocol)."""

    loss_types: tuple[str, ...] = ("sft", "dpo")
    """Losses whose gradients are mapped (keys of llava.train.losses.LOSSES, or grpo)."""
    steps: tuple[int, ...] = (20,)
    """Record the map of the gradient at these training steps (0 = the checkpoint itself)."""
    train_steps: int | None = None
    """Length of the cosine schedule (default: max(steps)); must be >= max(steps)."""
    learning_rates: dict[str, float] = field(default_factory=dict)
    """Per-loss LR (default: PAPER_LEARNING_RATES, 1e-6 for other preference losses)."""
    beta: float = 0.1
    """KL strength of the preference losses."""
    warmup_ratio: float = 0.03
    """Warmup share of the schedule (HF: ceil(ratio * train_steps) steps)."""
    max_grad_norm: float = 1.0
    """Gradient clipping before each update (HF Trainer default); maps are recorded unclipped."""
    mm_tunable_parts: str = "mm_vision_tower,mm_mlp_adapter,mm_language_model"
    """Parts trained in protocol mode (Stage 2: all, one LR)."""
    grpo: gradcam_grpo.GRPOGradcamConfig = field(default_factory=gradcam_grpo.GRPOGradcamConfig)
    """Sampling and rewards of the GRPO loss (analysis.gradcam_grpo)."""

    def __post_init__(self) -> None:
        unknown = [loss for loss in self.loss_types if loss not in LOSS_TYPES]
        if unknown or not self.loss_types:
            raise ValueError(f"loss_types {list(self.loss_types)}: choose from {sorted(LOSS_TYPES)}")
        if not self.steps or min(self.steps) < 0:
            raise ValueError(f"steps {list(self.steps)} must be a non-empty list of steps >= 0")
        self.steps = tuple(sorted(set(self.steps)))
        if self.train_steps is not None and self.train_steps < max(self.steps):
            raise ValueError(f"train_steps={self.train_steps} < the last recorded step {max(self.steps)}")
        bad = {k: v for k, v in self.learning_rates.items() if k not in LOSS_TYPES or not v > 0}
        if bad:
            raise ValueError(f"learning_rates {bad}: keys must be loss types and values > 0")
        if self.beta <= 0 or not 0 <= self.warmup_ratio < 1 or self.max_grad_norm <= 0:
            raise ValueError("need beta > 0, 0 <= warmup_ratio < 1 and max_grad_norm > 0")
        parse_tunable_parts(self.mm_tunable_parts)

    @property
    def num_train_steps(self) -> int:
        return self.train_steps if self.train_steps is not None else max(self.steps)

    @property
    def trains(self) -> bool:
        return max(self.steps) > 0

    def learning_rate(self, loss_type: str) -> float:
        return self.learning_rates.get(
            loss_type, PAPER_LEARNING_RATES.get(loss_type, PAPER_LEARNING_RATES["dpo"])
        )


@dataclass
class StepMap:
    """The gradient map of one loss at one step; ``learning_rate`` is that of the update that follows."""

    step: int
    loss: float
    learning_rate: float | None
    grid: np.ndarray


class VisionTokenCapture:
    """Context manager: a forward pre-hook on the projector that keeps its input A (the vision tokens).

    When A does not require grad (frozen tower) it is replaced by a detached leaf that does, which
    changes nothing upstream; otherwise ``retain_grad`` keeps its ``.grad`` after ``backward``.
    """

    def __init__(self, model: PreTrainedModel) -> None:
        self.projector = model.model.multi_modal_projector
        self.captured: list[torch.Tensor] = []
        self._handle = None

    def _hook(self, module: torch.nn.Module, args: tuple) -> tuple:
        features = args[0]
        if features.requires_grad:
            features.retain_grad()
        else:
            features = features.detach().requires_grad_(True)
        self.captured.append(features)
        return (features, *args[1:])

    def __enter__(self) -> VisionTokenCapture:
        self._handle = self.projector.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.remove()

    def single(self) -> torch.Tensor:
        if len(self.captured) != 1:
            raise RuntimeError(f"expected one projector call per forward, saw {len(self.captured)}")
        return self.captured[0]


def sample_loss(
    model: PreTrainedModel, batch: dict, loss_type: str, loss_config: LossConfig, ref: RefLogps | None
) -> torch.Tensor:
    """The trainer's per-sample loss of a one-sample batch (SFT reads the chosen side only; GRPO scores
    the group sampled for this step, ``batch["group"]``)."""
    if loss_type == gradcam_grpo.LOSS_TYPE:
        return gradcam_grpo.group_loss(model, batch["group"], batch["config"])
    if loss_type == "sft":
        logps, counts = chosen_logps(model, batch)
        stats = PairStats(logps, None, None, None, counts, None)
    else:
        if ref is None:
            raise ValueError(f"loss_type={loss_type!r} needs reference log-probs")
        chosen, rejected, n_chosen, n_rejected = pair_logps(model, batch)
        stats = PairStats(chosen, rejected, ref[0], ref[1], n_chosen, n_rejected)
    per_sample, _ = LOSSES[loss_type](stats, loss_config)
    return per_sample.sum()


def vision_token_gradient(
    model: PreTrainedModel,
    batch: dict,
    loss_type: str,
    loss_config: LossConfig,
    ref: RefLogps | None,
    backward: bool = False,
) -> tuple[float, torch.Tensor]:
    """(loss, ∂loss/∂A) with A the projector input ``[views, tokens, channels]``.

    ``backward=True`` also accumulates parameter gradients (for a training step); otherwise only the
    gradient w.r.t. A is computed.
    """
    with VisionTokenCapture(model) as capture:
        loss = sample_loss(model, batch, loss_type, loss_config, ref)
    features = capture.single()
    if backward:
        loss.backward()
        grad = features.grad
    else:
        (grad,) = torch.autograd.grad(loss, features)
    return float(loss.detach()), grad.detach()


def prepare_batch(
    record: PreferenceRecord,
    tokenizer,
    image_processor,
    config: PretrainedConfig,
    template: str,
    max_length: int,
) -> dict:
    """The one-sample batch the trainer would see for this record."""
    if len(record.images) != 1:
        raise RecordError(
            record.source, record.id, f"Grad-CAM needs exactly one image, got {len(record.images)}"
        )
    dataset = MultimodalDataset(
        [record], tokenizer, image_processor, template, image_token_counter(config), max_length
    )
    return DataCollator(tokenizer.pad_token_id)([dataset[0]])


def policy_reference_logps(model: PreTrainedModel, batch: dict) -> RefLogps:
    """Reference log-probs from the current (starting) weights, eval mode, no gradients."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        chosen, rejected, _, _ = pair_logps(model, batch)
    model.train(was_training)
    return chosen.float(), rejected.float()


class InitialWeights:
    """A CPU copy of the starting weights, restored after each single-sample training run."""

    def __init__(self, model: PreTrainedModel) -> None:
        self.state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}

    def restore(self, model: PreTrainedModel) -> None:
        model.load_state_dict(self.state)


def loss_maps(
    model: PreTrainedModel,
    batch: dict,
    loss_type: str,
    cfg: GradcamConfig,
    ref: RefLogps | None,
    image_hw: tuple[int, int],
    grpo: gradcam_grpo.GroupSampler | None = None,
) -> list[StepMap]:
    """Maps of one loss at ``cfg.steps``, training on the sample in between (module docstring); GRPO
    samples a new group from the current weights at every step (``batch["grpo"]``: the prompt batch)."""
    loss_config = LossConfig(beta=cfg.beta)
    last = max(cfg.steps)
    optimizer = scheduler = None
    if last > 0:
        set_trainable_parts(model, parse_tunable_parts(cfg.mm_tunable_parts))
        groups, _ = build_param_groups(model, cfg.learning_rate(loss_type), weight_decay=0.0)
        optimizer = torch.optim.AdamW(groups, lr=cfg.learning_rate(loss_type), betas=(0.9, 0.999), eps=1e-8)
        warmup = math.ceil(cfg.warmup_ratio * cfg.num_train_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, cfg.num_train_steps)
    model.train()
    params = [p for group in (optimizer.param_groups if optimizer else []) for p in group["params"]]
    maps = []
    for step in range(last + 1):
        step_batch = batch
        if loss_type == gradcam_grpo.LOSS_TYPE:
            if grpo is None:
                raise ValueError("the grpo loss needs a gradcam_grpo.GroupSampler")
            step_batch = {"group": grpo.sample(model, batch["grpo"]), "config": cfg.grpo}
        loss, grad = vision_token_gradient(
            model, step_batch, loss_type, loss_config, ref, backward=optimizer is not None
        )
        if step in cfg.steps:
            lr = scheduler.get_last_lr()[0] if scheduler else None
            maps.append(StepMap(step, loss, lr, gm.token_grid(grad, model.config, image_hw)))
        if step < last:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        logger.debug("%s step %d loss %.4f", loss_type, step, loss)
    if optimizer is not None:
        optimizer.zero_grad(set_to_none=True)
    return maps


def sample_maps(
    model: PreTrainedModel,
    batch: dict,
    cfg: GradcamConfig,
    ref: RefLogps | None,
    image_hw: tuple[int, int],
    initial: InitialWeights | None = None,
    grpo: gradcam_grpo.GroupSampler | None = None,
) -> dict[str, list[StepMap]]:
    """Maps of every loss type for one sample; weights are restored after each training run."""
    if initial is None and cfg.trains:
        raise ValueError("protocol mode (steps > 0) needs InitialWeights to restore the model between runs")
    out = {}
    for loss_type in cfg.loss_types:
        out[loss_type] = loss_maps(model, batch, loss_type, cfg, ref, image_hw, grpo)
        if initial is not None:
            initial.restore(model)
    return out


def select_records(
    records: Sequence[PreferenceRecord], ids: Sequence[str] | None, num_samples: int | None, data_path: str
) -> list[PreferenceRecord]:
    """The records with these ids (in this order), else the first ``num_samples`` (None: all)."""
    if ids:
        by_id = {record.id: record for record in records}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"{data_path}: no records with ids {missing[:5]} ({len(missing)} missing)")
        return [by_id[i] for i in dict.fromkeys(ids)]
    if num_samples is None:
        return list(records)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    return list(records[:num_samples])


def run_gradcam(
    checkpoint: str,
    data_path: str,
    out_dir: str | Path,
    cfg: GradcamConfig,
    image_folder: str | None = None,
    ids: Sequence[str] | None = None,
    num_samples: int | None = None,
    ref_logps_path: str | None = None,
    run_name: str | None = None,
    template: str = "qwen_1_5",
    model_max_length: int = 2048,
    device: str = "cpu",
    dtype: str = "float32",
) -> Path:
    """Compute, save and plot the maps of the selected samples; returns the path of gradcam.json."""
    require_llava_checkpoint(checkpoint, "--checkpoint")
    out = Path(out_dir)
    records = select_records(load_records(data_path, image_folder, "preference"), ids, num_samples, data_path)
    names = [safe_name(r.id) for r in records]
    if len(set(names)) != len(names):
        raise ValueError(f"{data_path}: sample ids collide once made file-safe: {names}")
    model, tokenizer, image_processor = load_model(checkpoint, dtype)
    model.to(device)
    cache = load_reference_logps(ref_logps_path, [r.id for r in records]) if ref_logps_path else None
    needs_ref = any(loss not in ("sft", gradcam_grpo.LOSS_TYPE) for loss in cfg.loss_types)
    initial = InitialWeights(model) if cfg.trains else None
    grpo = None
    if gradcam_grpo.LOSS_TYPE in cfg.loss_types:
        grpo = gradcam_grpo.GroupSampler(cfg.grpo, tokenizer, template, device)
    rows: list[dict[str, Any]] = []
    for record in records:
        batch = prepare_batch(record, tokenizer, image_processor, model.config, template, model_max_length)
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
        if grpo is not None:
            batch["grpo"] = gradcam_grpo.prompt_batch(
                record, tokenizer, image_processor, model.config, template, model_max_length, device
            )
        image = load_image(record.images[0], record.id, record.source)
        image_hw = (image.height, image.width)
        ref = None
        if needs_ref:
            ref = lookup(cache, [record.id], device) if cache else policy_reference_logps(model, batch)
        maps = sample_maps(model, batch, cfg, ref, image_hw, initial, grpo)
        extent = gm.map_extent(image_processor, model.config, *image_hw)
        rows += write_sample_outputs(out, record, image, extent, maps, cfg, image_folder)
        logger.info("gradient maps of %s done", record.id)
    doc = {
        "kind": "gradcam",
        "run": run_name or Path(checkpoint).name,
        "checkpoint": str(checkpoint),
        "vision_tower": getattr(model.config, "mm_vision_tower", None),
        "llm": getattr(model.config, "mm_language_model", None),
        "data_path": str(data_path),
        "reference": ref_logps_path or "starting model",
        "config": {**asdict(cfg), "num_train_steps": cfg.num_train_steps},
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / "gradcam.json"
    path.write_text(json.dumps(doc, indent=1), encoding="utf-8")
    return path


def _lr_pair(text: str) -> tuple[str, float]:
    loss, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOSS=LR, e.g. sft=5e-6")
    return loss, float(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--checkpoint", required=True, help="MLLM checkpoint directory (llava.model.builder.save_model)"
    )
    parser.add_argument("--data_path", required=True, help="DPO records (.json/.jsonl or YAML mixture)")
    parser.add_argument(
        "--image_folder", help="root that relative image (and meta.mask) paths resolve against"
    )
    parser.add_argument(
        "--out_dir", required=True, help="write gradcam.json, maps/, images/, overlays/, figures/ here"
    )
    chosen = parser.add_mutually_exclusive_group()
    chosen.add_argument("--ids", nargs="+", help="sample ids to map")
    chosen.add_argument("--ids_file", help="text file with one sample id per line")
    chosen.add_argument("--num_samples", type=int, default=8, help="map the first N records (default 8)")
    parser.add_argument(
        "--loss_types", nargs="+", default=["sft", "dpo"], help=f"losses, from {sorted(LOSS_TYPES)}"
    )
    parser.add_argument(
        "--steps",
        nargs="+",
        type=int,
        default=[20],
        help="training steps whose gradient is mapped (0: no training)",
    )
    parser.add_argument("--train_steps", type=int, help="cosine schedule length (default: max of --steps)")
    parser.add_argument(
        "--learning_rates",
        nargs="+",
        type=_lr_pair,
        default=[],
        help="LOSS=LR overrides (default sft=5e-6, preference and grpo 1e-6)",
    )
    parser.add_argument("--beta", type=float, default=0.1, help="KL strength of the preference losses")
    parser.add_argument(
        "--warmup_ratio", type=float, default=0.03, help="warmup share of the cosine schedule"
    )
    parser.add_argument(
        "--max_grad_norm", type=float, default=1.0, help="gradient clipping before each update"
    )
    parser.add_argument(
        "--mm_tunable_parts",
        default="mm_vision_tower,mm_mlp_adapter,mm_language_model",
        help="parts trained in protocol mode",
    )
    parser.add_argument(
        "--ref_logps", help="reference log-prob cache (llava.train.reference); default: starting model"
    )
    parser.add_argument(
        "--run_name", help="label of this checkpoint in the results (default: its directory name)"
    )
    parser.add_argument("--conv_template", default="qwen_1_5", help="chat template (qwen_1_5 or plain)")
    parser.add_argument("--model_max_length", type=int, default=2048, help="max tokens after image expansion")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="torch device"
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="weights dtype"
    )
    gradcam_grpo.add_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> Path:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    ids = args.ids
    if args.ids_file:
        ids = [
            line.strip()
            for line in Path(args.ids_file).read_text(encoding="utf-8").splitlines()
            if line.strip()
        ]
        if not ids:
            parser.error(f"--ids_file {args.ids_file} lists no ids")
    try:
        cfg = GradcamConfig(
            loss_types=tuple(args.loss_types),
            steps=tuple(args.steps),
            train_steps=args.train_steps,
            learning_rates=dict(args.learning_rates),
            beta=args.beta,
            warmup_ratio=args.warmup_ratio,
            max_grad_norm=args.max_grad_norm,
            mm_tunable_parts=args.mm_tunable_parts,
            grpo=gradcam_grpo.config_from_args(args),
        )
    except ValueError as error:
        parser.error(str(error))
    path = run_gradcam(
        args.checkpoint,
        args.data_path,
        args.out_dir,
        cfg,
        image_folder=args.image_folder,
        ids=ids,
        num_samples=args.num_samples,
        ref_logps_path=args.ref_logps,
        run_name=args.run_name,
        template=args.conv_template,
        model_max_length=args.model_max_length,
        device=args.device,
        dtype=args.dtype,
    )
    summary = gm.summarize(gm.read_gradcam_rows([path]))
    print(gm.summary_markdown(summary), end="")
    print(f"results: {path}")
    return path


if __name__ == "__main__":
    main()
