"""Training throughput and MFU of the paper's model sizes (random weights, no download), SFT and DPO.

Issue 9's benchmark. Each configuration is a Qwen2.5 LLM + SigLIP2 tower built from the released
configs (`llava.model.paper_configs`), trained for a few optimizer steps by the real `PivotTrainer`
on synthetic samples of one 384² image (576 image tokens) + `--prompt_tokens` + `--response_tokens`
text tokens (DPO: a chosen and a rejected response of that length). Everything trains (Stage 2: vision
tower, projector, LLM), AdamW, gradient checkpointing on; on a GPU `--bf16` without DeepSpeed exactly as
`llava.train.train` runs it (the same `PivotTrainingArguments.weights_dtype`/`autocast_dtype`: fp32
weights, gradients and optimizer states, bf16 autocast), fp32 on the CPU; DPO uses the shared image
encoding and a precomputed reference, scored under the same autocast (`--reference live` adds the
frozen-copy forward).

Reported per configuration and loss: samples/s and tokens/s (median step time after `--warmup`
untimed steps; tokens = every token of every sequence, both sides of a DPO pair, as the trainer logs),
MFU and peak memory (CUDA `max_memory_allocated`, or the process's peak RSS on the CPU).

FLOPs (`step_flops`) are model FLOPs, counted per sample from the configs: every matmul is 2·m·n·k;
- vision tower (as built, truncated to the layer the projector reads): patch embedding 2·n·(3·p²)·d,
  per layer 2·n·(4·d² + 2·d·d_ff) for the projections and MLP plus 4·n²·d for QKᵀ and AV
  (n = 576 patches + prefix tokens);
- projector: 2·576·(d_v·d_l + d_l·d_l);
- LLM per sequence of s = text + 576 tokens: per layer 2·s·(q, k, v, o and the 3 MLP matrices, GQA
  widths) + 4·s²·(heads·head_dim) (PaLM's convention: the full s², no causal halving), plus the LM head
  2·d·V only at the positions that predict a supervised token (the trainer keeps logits only there);
  embedding lookups are free;
- backward = 2 × forward; DPO = two LLM sequences per sample on ONE vision + projector pass, plus a
  forward of everything for `--reference live` (none when precomputed).
Gradient-checkpointing recomputation is not counted (MFU, not hardware FLOPs utilisation).
MFU = achieved FLOP/s / peak: H100 SXM and H200 989 TFLOP/s dense bf16 (`--peak_tflops` overrides);
on the CPU MFU is n/a. Reference point: the paper's recipe took 18 h on 8 H100s for 3M + 20K samples,
about 5.8 samples/s per GPU.

Run: `python benchmarks/throughput.py` (CPU: the smallest configuration, batch 1, 2 timed steps; GPU:
every paper configuration). Each configuration runs in its own child process; an out-of-memory
configuration is reported as such and the others still run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llava.model.paper_configs import LLM_CONFIGS, VISION_CONFIGS

logger = logging.getLogger(__name__)

PAPER_SAMPLES_PER_S_PER_GPU = (3_000_000 + 20_000) / (18 * 3600) / 8  # ≈ 5.8 (8×H100, 18 h)
PEAK_BF16_TFLOPS = {  # dense bf16 tensor-core peaks, matched against torch.cuda.get_device_name()
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "H100": 989.0,
    "H200": 989.0,
    "GH200": 989.0,
    "A100": 312.0,
}
CPU_CONFIGS = (("qwen2.5-0.5b", "siglip2-b16"),)
GPU_CONFIGS = (  # LLM scaling on So/16, then encoder scaling on the 1.5B LLM (the paper's main model)
    ("qwen2.5-0.5b", "siglip2-so16"),
    ("qwen2.5-1.5b", "siglip2-so16"),
    ("qwen2.5-3b", "siglip2-so16"),
    ("qwen2.5-7b", "siglip2-so16"),
    ("qwen2.5-1.5b", "siglip2-b16"),
    ("qwen2.5-1.5b", "siglip2-l16"),
    ("qwen2.5-1.5b", "siglip2-g16"),
)
LOSS_TYPES = ("sft", "dpo")
REFERENCES = ("precomputed", "live")


# ---- FLOPs ---------------------------------------------------------------------------------------
def vision_forward_flops(vision_config, num_prefix_tokens: int = 0) -> int:
    """Forward FLOPs of one image through a ViT-style tower (SigLIP, CLIP) of `vision_config`'s depth."""
    size = vision_config.image_size
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    p, d, ff = (
        int(vision_config.patch_size),
        int(vision_config.hidden_size),
        int(vision_config.intermediate_size),
    )
    patches = (size // p) ** 2
    n = patches + num_prefix_tokens
    channels = int(getattr(vision_config, "num_channels", 3))
    per_layer = 2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d
    return 2 * patches * channels * p * p * d + int(vision_config.num_hidden_layers) * per_layer


def projector_forward_flops(tokens: int, vision_hidden: int, llm_hidden: int) -> int:
    """Forward FLOPs of the `mlp2x_gelu` projector on `tokens` visual tokens."""
    return 2 * tokens * (vision_hidden * llm_hidden + llm_hidden * llm_hidden)


def llm_forward_flops(text_config, seq_len: int, logit_positions: int) -> int:
    """Forward FLOPs of one sequence through a Qwen2/Llama-style decoder; logits at `logit_positions` only."""
    d, ff = int(text_config.hidden_size), int(text_config.intermediate_size)
    heads = int(text_config.num_attention_heads)
    kv_heads = int(getattr(text_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(text_config, "head_dim", None) or d // heads)
    projections = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d + 3 * d * ff
    per_layer = 2 * seq_len * projections + 4 * seq_len * seq_len * heads * head_dim
    lm_head = 2 * logit_positions * d * int(text_config.vocab_size)
    return int(text_config.num_hidden_layers) * per_layer + lm_head


@dataclass(frozen=True)
class SampleShape:
    """Token layout of one synthetic sample: [576 image tokens][prompt][response]."""

    image_tokens: int
    prompt_tokens: int
    response_tokens: int

    @property
    def seq_len(self) -> int:
        return self.image_tokens + self.prompt_tokens + self.response_tokens


def step_flops(
    model_config, shape: SampleShape, loss_type: str, reference: str = "precomputed"
) -> dict[str, int]:
    """Model FLOPs of one training sample by part (see module docstring); `total` is their sum."""
    from llava.model.encoders import ENCODER_FAMILIES

    if loss_type not in LOSS_TYPES or reference not in REFERENCES:
        raise ValueError(
            f"loss_type {loss_type!r} / reference {reference!r}: choose {LOSS_TYPES} / {REFERENCES}"
        )
    vision_config, text_config = model_config.vision_config, model_config.text_config
    family = ENCODER_FAMILIES.get(getattr(model_config, "pivot_encoder_family", "siglip"))
    prefix = family.num_prefix_tokens(vision_config) if family else 0
    vision = vision_forward_flops(vision_config, prefix)
    projector = projector_forward_flops(
        shape.image_tokens, vision_config.hidden_size, text_config.hidden_size
    )
    sides = 2 if loss_type == "dpo" else 1
    llm = sides * llm_forward_flops(text_config, shape.seq_len, shape.response_tokens)
    live = loss_type == "dpo" and reference == "live"
    parts = {
        "vision": 3 * vision,
        "projector": 3 * projector,
        "llm": 3 * llm,
        "reference": (vision + projector + llm) if live else 0,
    }
    parts["total"] = sum(parts.values())
    return parts


def peak_flops(device_name: str, override_tflops: float | None) -> float | None:
    """Peak dense bf16 FLOP/s of the device, or None (CPU, unknown GPU)."""
    if override_tflops:
        return override_tflops * 1e12
    for key, tflops in PEAK_BF16_TFLOPS.items():
        if key in device_name:
            return tflops * 1e12
    return None


# ---- one configuration ---------------------------------------------------------------------------
@dataclass(frozen=True)
class RunSpec:
    """One measurement: a model (paper config names, or config dicts for tests) and a loss."""

    llm: str | dict
    vision: str | dict
    loss_type: str
    reference: str = "precomputed"
    batch_size: int = 1
    warmup: int = 1
    steps: int = 2
    prompt_tokens: int = 64
    response_tokens: int = 192
    device: str = "auto"
    optim: str | None = None  # None: the Trainer's default (adamw_torch_fused), as the training scripts use
    seed: int = 0
    lora: bool = (
        False  # LoRA (llava.train.lora, r 64, on LLM and tower; projector full) instead of full weights
    )

    def __post_init__(self) -> None:
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type {self.loss_type!r}: choose one of {LOSS_TYPES}")
        if self.reference not in REFERENCES:
            raise ValueError(f"reference {self.reference!r}: choose one of {REFERENCES}")
        for name in ("batch_size", "steps", "prompt_tokens", "response_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")

    @property
    def label(self) -> str:
        name = lambda x: x if isinstance(x, str) else "custom"  # noqa: E731
        return f"{name(self.llm)} + {name(self.vision)}"


class SyntheticItems(list):
    """Dataset items with the `ids` list that `PivotTrainer`'s `MatchedSampler` orders samples by."""

    @property
    def ids(self) -> list[str]:
        return [item["id"] for item in self]


def synthetic_items(spec: RunSpec, model_config, vocab: int, count: int) -> SyntheticItems:
    """Dataset items (docs/CONTRACTS.md §3) with random text ids around one random 384² image."""
    import torch

    generator = torch.Generator().manual_seed(spec.seed)
    image_id = int(model_config.image_token_id)
    size = int(model_config.vision_config.image_size)
    n_image = int(model_config.image_seq_length)

    def text(n: int) -> torch.Tensor:
        ids = torch.randint(0, vocab - 1, (n,), generator=generator)
        return torch.where(ids >= image_id, ids + 1, ids)  # never the image token

    items = []
    for i in range(count):
        prompt = torch.cat([torch.full((n_image,), image_id), text(spec.prompt_tokens)])
        item: dict[str, Any] = {
            "id": f"sample-{i}",
            "pixel_values": torch.randn(1, 3, size, size, generator=generator),
            "image_sizes": torch.tensor([[size, size]]),
        }
        sides = ("", "rejected_") if spec.loss_type == "dpo" else ("",)
        for side in sides:
            response = text(spec.response_tokens)
            item[f"{side}input_ids"] = torch.cat([prompt, response])
            item[f"{side}labels"] = torch.cat([torch.full((len(prompt),), -100), response])
        items.append(item)
    return SyntheticItems(items)


def _resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def measure(spec: RunSpec, peak_tflops: float | None = None) -> dict[str, Any]:
    """Build the model, train `warmup + steps` optimizer steps with `PivotTrainer`, return the numbers."""
    import torch
    import transformers
    from transformers import TrainerCallback

    from llava.data.collator import DataCollator
    from llava.model.adapters import base_llava
    from llava.model.paper_configs import build_model_from_configs, describe
    from llava.train.args import PivotTrainingArguments
    from llava.train.param_groups import TUNABLE_PARTS, set_trainable_parts
    from llava.train.reference import compute_reference_logps
    from llava.train.trainer import PivotTrainer

    device = _resolve_device(spec.device)
    cuda = device.startswith("cuda")
    transformers.set_seed(spec.seed)
    step_times: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if cuda:
                torch.cuda.synchronize()
            step_times.append(time.perf_counter() - self.start)

    with tempfile.TemporaryDirectory(prefix="throughput_") as out:
        args = PivotTrainingArguments(
            output_dir=out,
            loss_type=spec.loss_type,
            reference="none" if spec.loss_type == "sft" else spec.reference,
            per_device_train_batch_size=spec.batch_size,
            per_device_eval_batch_size=spec.batch_size,
            max_steps=spec.warmup + spec.steps,
            learning_rate=1e-6,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            **({"optim": spec.optim} if spec.optim else {}),
            bf16=cuda,
            gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False},
            logging_steps=spec.warmup + spec.steps,
            save_strategy="no",
            report_to="none",
            disable_tqdm=True,
            dataloader_num_workers=0,
            use_cpu=not cuda,
            seed=spec.seed,
        )
        with torch.device(device):  # initialise the random weights where they will train
            model, tokenizer, _ = build_model_from_configs(spec.llm, spec.vision, dtype=args.weights_dtype)
        set_trainable_parts(model, TUNABLE_PARTS)
        if spec.lora:
            from llava.train.lora import LoraArguments, apply_lora

            model = apply_lora(model, TUNABLE_PARTS, LoraArguments(lora_enable=True, lora_vision=True))
        shape = SampleShape(int(model.config.image_seq_length), spec.prompt_tokens, spec.response_tokens)
        items = synthetic_items(
            spec, model.config, len(tokenizer), spec.batch_size * (spec.warmup + spec.steps)
        )
        collator = DataCollator(tokenizer.pad_token_id)
        precomputed = spec.loss_type == "dpo" and spec.reference == "precomputed"
        ref_logps = (
            compute_reference_logps(
                model, items, collator, spec.batch_size, device, autocast_dtype=args.autocast_dtype
            )
            if precomputed
            else None
        )
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        trainer = PivotTrainer(
            model=model,
            args=args,
            train_dataset=items,
            data_collator=collator,
            ref_logps=ref_logps,
            callbacks=[StepTimer()],
        )
        train_loss = trainer.train().training_loss
    timed = step_times[spec.warmup :]
    step_s = statistics.median(timed)
    flops = step_flops(model.config, shape, spec.loss_type, spec.reference)
    sequences = 2 if spec.loss_type == "dpo" else 1
    device_name = torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)"
    peak = peak_flops(device_name, peak_tflops) if cuda else None
    achieved = flops["total"] * spec.batch_size / step_s
    if spec.lora:  # the FLOP count is full training's (weight gradients of every layer): no MFU for LoRA
        peak = None
    return {
        **{k: v for k, v in asdict(spec).items() if k not in ("llm", "vision")},
        "model": spec.label,
        "device_name": device_name,
        "dtype": f"{args.weights_dtype} weights"
        + (f", {str(args.autocast_dtype).removeprefix('torch.')} autocast" if args.autocast_dtype else ""),
        "sizes": describe(base_llava(model)),
        "seq_len": shape.seq_len,
        "image_tokens": shape.image_tokens,
        "train_loss": train_loss,
        "step_s": timed,
        "samples_per_s": spec.batch_size / step_s,
        "tokens_per_s": spec.batch_size * sequences * shape.seq_len / step_s,
        "flops_per_sample": flops,
        "achieved_tflops": None if spec.lora else achieved / 1e12,
        "mfu": achieved / peak if peak else None,
        "peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30
        if cuda
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "memory_kind": "CUDA max_memory_allocated" if cuda else "peak RSS of the process",
    }


# ---- orchestration -------------------------------------------------------------------------------
def _child(spec: RunSpec, peak_tflops: float | None, workdir: Path, index: int) -> dict[str, Any]:
    """Measure one spec in a fresh interpreter (clean memory, survives out-of-memory)."""
    out = workdir / f"result_{index}.json"
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--child",
        json.dumps(asdict(spec)),
        "--child_out",
        str(out),
    ]
    if peak_tflops:
        cmd += ["--peak_tflops", str(peak_tflops)]
    logger.info("measuring %s %s (batch %d)", spec.label, spec.loss_type, spec.batch_size)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode == 0:
        return json.loads(out.read_text())
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    error = (
        "out of memory"
        if "OutOfMemoryError" in proc.stderr
        else (lines[-1] if lines else f"exit {proc.returncode}")
    )
    return {
        "model": spec.label,
        "loss_type": spec.loss_type,
        "batch_size": spec.batch_size,
        "error": error,
        "stderr_tail": "\n".join(lines[-25:]),
    }


def summarise(results: list[dict[str, Any]]) -> str:
    """The Markdown table (model | loss | samples/s | tokens/s | MFU | peak memory) and the reference point."""
    lines = [
        "| model | loss | training | batch | step time (s) | samples/s | tokens/s | TFLOP/s | MFU | peak memory (GB) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "error" in r:
            lines.append(
                f"| {r['model']} | {r['loss_type']} | {_training(r)} | {r['batch_size']} | {r['error']} | | | | | |"
            )
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
        tflops = "n/a" if r["achieved_tflops"] is None else f"{r['achieved_tflops']:.2f}"
        lines.append(
            f"| {r['model']} | {r['loss_type']} | {_training(r)} | {r['batch_size']} "
            f"| {statistics.median(r['step_s']):.3f} "
            f"| {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} | {tflops} | {mfu} "
            f"| {r['peak_memory_gb']:.1f} |"
        )
    done = [r for r in results if "error" not in r]
    if done:
        r = done[0]
        lines += [
            "",
            f"device: {r['device_name']}, {r['dtype']}, {r['seq_len']} tokens per sequence ({r['image_tokens']} image + "
            f"{r['prompt_tokens']} prompt + {r['response_tokens']} response), {r['optim'] or 'adamw_torch_fused'}, gradient checkpointing, "
            f"everything trained, DPO reference {r['reference']}; {r['warmup']} warm-up + {r['steps']} timed steps "
            f"(median); memory: {r['memory_kind']}",
            f"paper reference: about {PAPER_SAMPLES_PER_S_PER_GPU:.1f} samples/s per GPU "
            "(3M + 20K samples in 18 h on 8 H100s, ZeRO-3)",
        ]
    return "\n".join(lines)


def _training(result: dict[str, Any]) -> str:
    return "LoRA r64" if result.get("lora") else "full"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--configs",
        default=None,
        help="comma-separated LLM:VISION pairs of paper_configs names, e.g. "
        "qwen2.5-1.5b:siglip2-so16 (default: the smallest on CPU, every paper pair on GPU)",
    )
    parser.add_argument("--losses", default="sft,dpo", help="comma-separated subset of sft,dpo")
    parser.add_argument(
        "--training",
        default=None,
        help="comma-separated subset of full,lora (default: full on CPU; full,lora on GPU: the LoRA rows "
        "train r-64 adapters on LLM and tower with the projector full, llava.train.lora)",
    )
    parser.add_argument(
        "--reference",
        default="precomputed",
        choices=REFERENCES,
        help="DPO reference: precomputed log-probs (the scripts' default) or a live frozen copy",
    )
    parser.add_argument(
        "--batch_size", type=int, default=None, help="per-device batch (default: 1 on CPU, 4 on GPU)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed optimizer steps (default: 1 on CPU, 2 on GPU)"
    )
    parser.add_argument(
        "--steps", type=int, default=None, help="timed optimizer steps (default: 2 on CPU, 5 on GPU)"
    )
    parser.add_argument(
        "--prompt_tokens", type=int, default=64, help="text tokens of the prompt besides the image"
    )
    parser.add_argument(
        "--response_tokens", type=int, default=192, help="tokens of each response (supervised)"
    )
    parser.add_argument("--device", default="auto", help="torch device; auto = cuda when available")
    parser.add_argument(
        "--optim",
        default=None,
        help="HF optimizer name (default: the Trainer's, adamw_torch_fused, as in training)",
    )
    parser.add_argument(
        "--peak_tflops",
        type=float,
        default=None,
        help="peak dense bf16 TFLOP/s for MFU (default: by GPU name, H100/H200 989)",
    )
    parser.add_argument("--json_out", default=None, help="also write every raw measurement to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_out", default=None, help=argparse.SUPPRESS)
    return parser


def plan(args: argparse.Namespace, cuda: bool) -> list[RunSpec]:
    """The specs the command line asks for, with the device-dependent defaults filled in."""
    if args.configs:
        pairs = []
        for item in args.configs.split(","):
            llm, sep, vision = item.strip().partition(":")
            if not sep:
                raise SystemExit(f"--configs: {item!r} is not LLM:VISION")
            if llm not in LLM_CONFIGS or vision not in VISION_CONFIGS:
                raise SystemExit(
                    f"--configs: {item!r}; LLMs: {sorted(LLM_CONFIGS)}, vision towers: {sorted(VISION_CONFIGS)}"
                )
            pairs.append((llm, vision))
    else:
        pairs = list(GPU_CONFIGS if cuda else CPU_CONFIGS)
    losses = [loss.strip() for loss in args.losses.split(",") if loss.strip()]
    if not losses or set(losses) - set(LOSS_TYPES):
        raise SystemExit(f"--losses {args.losses!r}: choose from {LOSS_TYPES}")
    defaults = (
        {"batch_size": 4, "warmup": 2, "steps": 5} if cuda else {"batch_size": 1, "warmup": 1, "steps": 2}
    )
    chosen = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in defaults.items()}
    modes = [m.strip() for m in (args.training or ("full,lora" if cuda else "full")).split(",") if m.strip()]
    if not modes or set(modes) - {"full", "lora"}:
        raise SystemExit(f"--training {args.training!r}: choose from full, lora")
    return [
        RunSpec(
            llm,
            vision,
            loss,
            args.reference,
            prompt_tokens=args.prompt_tokens,
            response_tokens=args.response_tokens,
            device=args.device,
            optim=args.optim,
            lora=mode == "lora",
            **chosen,
        )
        for llm, vision in pairs
        for loss in losses
        for mode in modes
    ]


def main(argv: Sequence[str] | None = None) -> list[dict[str, Any]]:
    args = _parser().parse_args(argv)
    if args.child:
        result = measure(RunSpec(**json.loads(args.child)), args.peak_tflops)
        Path(args.child_out).write_text(json.dumps(result))
        return [result]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    import torch

    cuda = _resolve_device(args.device).startswith("cuda") and torch.cuda.is_available()
    specs = plan(args, cuda)
    with tempfile.TemporaryDirectory(prefix="throughput_") as tmp:
        results = [_child(spec, args.peak_tflops, Path(tmp), i) for i, spec in enumerate(specs)]
    print(summarise(results))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
