"""DPO training-step time and peak memory of five trainer setups on one vision-heavy tiny MLLM, in one run.

Issue 3's benchmark. The same checkpoint, the same preference pairs, batch size, optimizer (AdamW,
constant LR, no weight decay, grad-norm clip 1.0), β = 0.1, fp32, for:

  (a) `PivotTrainer`, each pair's image encoded once (`share_image_encoding`), reference
      log-probs precomputed in one pass before training (`reference=precomputed`);
  (b) `PivotTrainer`, each side of a pair encoding the image itself, with a live frozen reference
      model (`share_image_encoding=False`, `reference=live`): 2 policy + 2 reference encodings;
  (c) TRL's `DPOTrainer` with a `LlavaProcessor` built from the checkpoint. TRL 1.16 refuses
      `precompute_ref_log_probs` for vision datasets, so it keeps a live reference model (loaded
      from the checkpoint directory, as TRL does by default) and its collator repeats every image
      for the chosen and the rejected sequence: 2 policy + 2 reference encodings.
  (d) (a) trained through LoRA (llava.train.lora, issue 18): rank-16 adapters on the LLM's attention and
      MLP projections and on the tower's linear layers (`--lora_vision`), the projector trained fully;
      the same trainable parts as (a), so (d)/(a) is LoRA against full training on the same model;
  (e) (d) with `reference=live`: the reference is the base model with the adapters disabled (no copy).

The model: a SigLIP tower (more layers and width than the LLM, small patches: many image tokens) →
`mlp2x_gelu` → a tiny Qwen2, built with `llava.model.builder` and saved as a plain HF checkpoint.
The data: a synthetic world (`llava.data.synthetic`) converted by the MMPR converter (`llava.data.mmpr`).

Each configuration runs in its own child process (a fresh model; `--repeats` rounds a, b, c, a, b, c, ...
so that all see the same load on a shared machine, steps pooled), warms up for `--warmup` optimizer
steps, then times `--steps` steps from `on_step_begin` to `on_step_end` (forward, backward, clip,
AdamW; data loading and collation happen before `on_step_begin` and are reported apart), in wall
time and in the process's CPU time (steadier than wall time on a shared machine; with the default
single torch thread it is the compute the step needed). Peak memory:
on CUDA `torch.cuda.max_memory_allocated()` minus the memory held once the model is on the device; on
CPU the child's peak RSS (`ru_maxrss`) minus that of a baseline child that only imports the same
libraries and loads the model. The one-off reference pass of (a) is timed separately; it costs about
one forward per pair and amortises over epochs (the paper trains 3).

Run: `python benchmarks/dpo_step.py` (or `python -m benchmarks.dpo_step`); `--quick` for a smoke run.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.step_harness import (  # noqa: E402
    BASELINE,
    add_harness_arguments,
    add_peak_memory,
    load_config_inputs,
    memory_mb,
    pool_runs,
    run_child,
    selected_configs,
)

logger = logging.getLogger(__name__)

CONFIGS: dict[str, str] = {
    "a": "PivotTrainer: shared image encoding + precomputed reference",
    "b": "PivotTrainer: image encoded per side + live reference model",
    "c": "TRL DPOTrainer (live reference model)",
    "d": "(a) with LoRA (r 16) on LLM + tower, projector full",
    "e": "(d) with the live reference: adapters disabled, no copy",
}
LORA_CONFIGS = ("d", "e")
LORA_RANK = 16
TEMPLATE = "qwen_1_5"


@dataclass
class BenchSettings:
    """Model, data and schedule shared by every configuration (defaults: the full run)."""

    image_size: int = 128
    patch_size: int = 8
    vision_hidden: int = 192
    vision_layers: int = 6
    vision_heads: int = 4
    llm_hidden: int = 64
    llm_layers: int = 2
    batch_size: int = 4
    warmup: int = 2
    steps: int = 8
    learning_rate: float = 1e-6
    beta: float = 0.1
    seed: int = 0
    device: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        positive = ("image_size", "patch_size", "vision_hidden", "vision_heads", "llm_hidden", "llm_layers")
        for name in (*positive, "batch_size", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0:
            raise ValueError(f"--warmup and --threads must be >= 0, got {self.warmup}, {self.threads}")
        if self.image_size % self.patch_size:
            raise ValueError(
                f"--image_size {self.image_size} must be a multiple of --patch_size {self.patch_size}"
            )
        if self.image_size < 32:
            raise ValueError(
                f"--image_size must be >= 32 (the synthetic world's minimum), got {self.image_size}"
            )
        if self.vision_hidden % self.vision_heads:
            raise ValueError(f"--vision_hidden {self.vision_hidden} must be divisible by --vision_heads")
        if self.vision_layers < 2:
            raise ValueError("--vision_layers must be >= 2 (the projector reads the penultimate layer)")
        if self.learning_rate <= 0 or self.beta <= 0:
            raise ValueError("--learning_rate and --beta must be > 0")

    @property
    def tokens_per_image(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def num_pairs(self) -> int:
        """One epoch covers every step plus one batch, so every step's batch is fetched between steps.

        (accelerate's loader reads one batch ahead, so the last batch of an epoch costs no fetch time).
        """
        return self.batch_size * (self.total_steps + 1)


# ---- assets (parent process, once) ---------------------------------------------------------------
def write_vision_tower(out_dir: Path, s: BenchSettings) -> Path:
    """A SigLIP tower wider and deeper than the LLM, with its PIL image processor."""
    import torch
    import transformers

    from llava.model.encoders import ENCODER_FAMILIES, image_processor_for

    config = transformers.SiglipVisionConfig(
        hidden_size=s.vision_hidden,
        intermediate_size=4 * s.vision_hidden,
        num_hidden_layers=s.vision_layers,
        num_attention_heads=s.vision_heads,
        image_size=s.image_size,
        patch_size=s.patch_size,
    )
    torch.manual_seed(s.seed)
    transformers.SiglipVisionModel(config).save_pretrained(out_dir)
    image_processor_for(ENCODER_FAMILIES["siglip"], s.image_size).save_pretrained(out_dir)
    return out_dir


def prepare_assets(workdir: Path, s: BenchSettings) -> dict[str, str]:
    """Write the world, the DPO records and the MLLM checkpoint; returns their paths."""
    from llava.data.mmpr import MMPRConfig, convert_mmpr, write_conversion
    from llava.data.synthetic import generate_world
    from llava.model.builder import ModelConfig, build_model, save_model
    from llava.tiny import write_llm

    world = workdir / "world"
    generate_world(
        world, seed=s.seed, num_train=math.ceil(s.num_pairs / 2), num_val=1, image_size=s.image_size
    )
    conversion = convert_mmpr(
        MMPRConfig(
            meta_path=str(world / "mmpr" / "meta.json"),
            size=s.num_pairs,
            token_limit=0,
            model_max_length=0,
            image_folder=str(world),
        )
    )
    paths = write_conversion(conversion, workdir / "data" / "dpo.json", workdir / "data" / "sft.json")
    llm = write_llm(workdir / "llm", s.seed, s.llm_hidden, s.llm_layers)
    tower = write_vision_tower(workdir / "siglip", s)
    model, tokenizer, image_processor = build_model(ModelConfig(llm=str(llm), vision_tower=str(tower)))
    save_model(model, tokenizer, image_processor, workdir / "model")
    return {"world": str(world), "data": str(paths["dpo"]), "model": str(workdir / "model")}


def model_sizes(checkpoint: str) -> dict[str, int]:
    from llava.model.builder import load_model

    model = load_model(checkpoint)[0]
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {
        "vision_params": count(model.model.vision_tower),
        "projector_params": count(model.model.multi_modal_projector),
        "llm_params": count(model.model.language_model),
        "vision_layers_used": int(model.config.vision_config.num_hidden_layers),
    }


# ---- one configuration (child process) ----------------------------------------------------------
class _StepTimer:
    """TrainerCallback recording on_step_begin / on_step_end times (synchronising CUDA first)."""

    def __init__(self, cuda: bool) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                timer.begin.append(timer.now())
                timer.cpu_begin.append(time.process_time())

            def on_step_end(self, args, state, control, **kwargs):
                timer.end.append(timer.now())
                timer.cpu_end.append(time.process_time())

        self.cuda = cuda
        self.begin: list[float] = []
        self.end: list[float] = []
        self.cpu_begin: list[float] = []
        self.cpu_end: list[float] = []
        self.callback = Callback()

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def step_times(self) -> list[float]:
        return [end - begin for begin, end in zip(self.begin, self.end)]

    def cpu_times(self) -> list[float]:
        return [end - begin for begin, end in zip(self.cpu_begin, self.cpu_end)]

    def data_times(self) -> list[float]:
        return [begin - end for begin, end in zip(self.begin[1:], self.end[:-1])]


def _common_args(s: BenchSettings, device: str, output_dir: str) -> dict[str, Any]:
    return {
        "output_dir": output_dir,
        "per_device_train_batch_size": s.batch_size,
        "gradient_accumulation_steps": 1,
        "max_steps": s.total_steps,
        "learning_rate": s.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "beta": s.beta,
        "bf16": False,
        "fp16": False,
        "gradient_checkpointing": False,
        "logging_steps": s.total_steps + 1,
        "save_strategy": "no",
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": s.seed,
        "use_cpu": device == "cpu",
    }


def _train_pivot(
    name: str, model, tokenizer, image_processor, records, s: BenchSettings, device: str, timer, out: str
):
    from llava.data.collator import DataCollator
    from llava.data.dataset import MultimodalDataset
    from llava.model.image_tokens import image_token_counter
    from llava.train.args import PivotTrainingArguments
    from llava.train.reference import compute_reference_logps
    from llava.train.trainer import PivotTrainer

    extra: dict[str, Any] = {
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad)
    }
    shared = name != "b"
    precomputed = name in ("a", "d")
    if name in LORA_CONFIGS:
        from llava.model.parts import TUNABLE_PARTS
        from llava.train.lora import LoraArguments, apply_lora

        lora = LoraArguments(
            lora_enable=True, lora_r=LORA_RANK, lora_alpha=2 * LORA_RANK, lora_dropout=0.0, lora_vision=True
        )
        model = apply_lora(model, TUNABLE_PARTS, lora)
        extra["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    dataset = MultimodalDataset(
        records, tokenizer, image_processor, TEMPLATE, image_token_counter(model.config), 2048
    )
    collator = DataCollator(tokenizer.pad_token_id)
    ref_logps = None
    if precomputed:
        start = timer.now()
        ref_logps = compute_reference_logps(model, dataset, collator, s.batch_size, device, True)
        extra["precompute_s"] = timer.now() - start
        extra["precompute_pairs"] = len(ref_logps)
    args = PivotTrainingArguments(
        **_common_args(s, device, out),
        loss_type="dpo",
        reference="precomputed" if precomputed else "live",
        share_image_encoding=shared,
    )
    trainer = PivotTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
        ref_logps=ref_logps,
        callbacks=[timer.callback],
    )
    extra["train_loss"] = trainer.train().training_loss
    return extra


def trl_dataset(records) -> Any:
    """TRL 1.16's vision preference format: `images` (PIL list), standard-format `prompt`/`chosen`/`rejected`.

    The prompt is rendered with our `qwen_1_5` template (with its `<image>` placeholder, which the
    `LlavaProcessor` expands); the completions end with `<|im_end|>` as our supervised targets do.
    """
    import datasets

    from llava.data.images import load_image
    from llava.data.templates import get_template

    template = get_template(TEMPLATE)
    rows: dict[str, list] = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for record in records:
        rows["images"].append([load_image(path, record.id, record.source) for path in record.images])
        rows["prompt"].append(template.render_prompt(record.prompt))
        rows["chosen"].append(record.chosen + template.reply_suffix)
        rows["rejected"].append(record.rejected + template.reply_suffix)
    return datasets.Dataset.from_dict(rows)


def _train_trl(model, tokenizer, image_processor, records, s: BenchSettings, device: str, timer, out: str):
    from transformers import LlavaProcessor
    from trl import DPOConfig, DPOTrainer

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=s.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
    )
    args = DPOConfig(
        **_common_args(s, device, out),
        loss_type="sigmoid",
        max_length=None,
        precompute_ref_log_probs=False,  # TRL 1.16 raises for vision datasets when True
    )
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=trl_dataset(records),
        processing_class=processor,
        callbacks=[timer.callback],
    )
    return {"train_loss": trainer.train().training_loss}


def run_config(name: str, assets: dict[str, str], s: BenchSettings) -> dict[str, Any]:
    """Train one configuration in this process; returns its timings and memory (see module docstring)."""
    inputs = load_config_inputs(
        name, assets["model"], (assets["data"], assets["world"], "preference"), s.seed, s.threads, s.device
    )
    result = inputs.result
    if name != BASELINE:
        timer = _StepTimer(inputs.cuda)
        train = _train_trl if name == "c" else functools.partial(_train_pivot, name)
        with tempfile.TemporaryDirectory(prefix=f"dpo_step_{name}_") as out:
            result.update(train(*inputs.parts(), s, inputs.device, timer, out))
        steps = timer.step_times()
        if len(steps) != s.total_steps:
            raise RuntimeError(f"config {name}: timed {len(steps)} steps, expected {s.total_steps}")
        result["step_s"] = steps[s.warmup :]
        result["cpu_s"] = timer.cpu_times()[s.warmup :]
        result["data_s"] = timer.data_times()[max(s.warmup - 1, 0) :]  # the fetch before each timed step
    return add_peak_memory(inputs)


# ---- orchestration (parent) ------------------------------------------------------------------------
def pool_dpo_runs(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Repeated rounds merged (benchmarks.step_harness.pool_runs), the reference pass's time the median."""
    pooled = pool_runs(runs, concatenated=("step_s", "cpu_s", "data_s"), averaged=("train_loss",))
    for name, merged in pooled.items():
        if "precompute_s" in merged:
            merged["precompute_runs_s"] = [run["precompute_s"] for run in runs if run["config"] == name]
            merged["precompute_s"] = statistics.median(merged["precompute_runs_s"])
    return pooled


def _median(result: dict[str, Any], key: str) -> float:
    return statistics.median(result[key]) if result.get(key) else float("nan")


def summarise(results: dict[str, dict[str, Any]], settings: BenchSettings, sizes: dict[str, int]) -> str:
    """The Markdown report: settings, the table, the ratios, the reasons a configuration did not run."""
    baseline = results[BASELINE]
    on_cuda = "peak_mb" in baseline
    memory_kind = (
        "CUDA max_memory_allocated above the loaded model" if on_cuda else "peak RSS minus load-only baseline"
    )
    s = settings
    a_runs = max((r.get("repeats", 1) for r in results.values() if "step_s" in r), default=0)
    lines = [
        f"device: {baseline['device_name']}, torch CPU threads: {baseline['threads']}, fp32, batch {s.batch_size} "
        f"pairs, {s.warmup} warm-up + {s.steps} timed steps x {a_runs} run(s), AdamW lr {s.learning_rate:g} constant, beta {s.beta:g}",
        f"images {s.image_size}px, patch {s.patch_size} -> {s.tokens_per_image} tokens/image; SigLIP "
        f"{s.vision_layers} layers ({sizes['vision_layers_used']} used) x {s.vision_hidden} wide "
        f"({sizes['vision_params'] / 1e6:.2f}M params), projector {sizes['projector_params'] / 1e6:.2f}M, "
        f"Qwen2 {s.llm_layers} layers x {s.llm_hidden} ({sizes['llm_params'] / 1e6:.2f}M params)",
        f"memory: {memory_kind} (load-only baseline peak RSS {baseline['max_rss_mb']:.0f} MB)",
        "",
        "| config | step time median (s) | step time mean (s) | step CPU time median (s) | data time median (s) "
        "| peak memory (MB) | mean DPO loss | step time / (a) | memory / (a) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    a = results.get("a", {})
    a_ok = "step_s" in a
    for name, title in CONFIGS.items():
        r = results.get(name, {})
        if "step_s" not in r:
            lines.append(f"| ({name}) {title} | not run | | | | | | | |")
            continue
        mem = memory_mb(r, baseline)
        t_ratio = f"{_median(r, 'step_s') / _median(a, 'step_s'):.2f}x" if a_ok else "n/a"
        m_ratio = f"{mem / memory_mb(a, baseline):.2f}x" if a_ok else "n/a"
        lines.append(
            f"| ({name}) {title} | {_median(r, 'step_s'):.3f} | {statistics.fmean(r['step_s']):.3f} "
            f"| {_median(r, 'cpu_s'):.3f} | {_median(r, 'data_s'):.3f} | {mem:.0f} | {r['train_loss']:.4f} "
            f"| {t_ratio} | {m_ratio} |"
        )
    lines.append("")
    if a_ok:
        pre, pairs = a["precompute_s"], a["precompute_pairs"]
        lines.append(
            f"(a) one-off reference pass (no grad, before training): {pre:.2f} s for {pairs} pairs = "
            f"{pre / pairs * s.batch_size:.3f} s per batch of {s.batch_size}, paid once and amortised over all epochs"
        )
    for name in ("b", "c"):
        r = results.get(name, {})
        if a_ok and "step_s" in r:
            wall = _median(r, "step_s") / _median(a, "step_s")
            cpu = _median(r, "cpu_s") / _median(a, "cpu_s")
            mem = memory_mb(r, baseline) / memory_mb(a, baseline)
            verdict = "meets" if wall >= 1.5 and mem > 1 else "MISSES"
            lines.append(
                f"({name}) / (a): {wall:.2f}x the step time ({cpu:.2f}x in CPU time), {mem:.2f}x the peak memory "
                f"-> (a) {verdict} the target (>= 1.5x faster and lower peak memory)"
            )
    for name in LORA_CONFIGS:
        r = results.get(name, {})
        if a_ok and "step_s" in r:
            lines.append(
                f"({name}) / (a), LoRA against full training: {_median(r, 'step_s') / _median(a, 'step_s'):.2f}x "
                f"the step time ({_median(r, 'cpu_s') / _median(a, 'cpu_s'):.2f}x in CPU time), "
                f"{memory_mb(r, baseline) / memory_mb(a, baseline):.2f}x the peak memory, "
                f"{r['trainable_params'] / a['trainable_params']:.3f}x the trainable parameters"
            )
    for name, r in results.items():
        if "error" in r:
            lines.append(f"({name}) could not run: {r['error']}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = BenchSettings()
    help_text = {
        "image_size": "tower input resolution in pixels (also the synthetic images' size)",
        "patch_size": "tower patch size (tokens per image = (image_size / patch_size)^2)",
        "vision_hidden": "SigLIP hidden width (MLP 4x)",
        "vision_layers": "SigLIP layers before truncation (the projector reads the penultimate)",
        "vision_heads": "SigLIP attention heads",
        "llm_hidden": "tiny Qwen2 hidden width",
        "llm_layers": "tiny Qwen2 layers",
        "batch_size": "preference pairs per optimizer step (all configurations)",
        "warmup": "untimed warm-up optimizer steps",
        "steps": "timed optimizer steps",
        "learning_rate": "AdamW learning rate (constant)",
        "beta": "DPO beta",
        "seed": "seed of weights, data and sampling",
        "device": "torch device; auto = cuda when available",
        "threads": "torch CPU threads per configuration; 0 = torch's default (1 keeps timings stable on a shared machine)",
    }
    for f in fields(BenchSettings):
        parser.add_argument(
            f"--{f.name}",
            type=type(getattr(defaults, f.name)),
            default=getattr(defaults, f.name),
            help=f"{help_text[f.name]} (default: %(default)s)",
        )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: 1 warm-up + 2 timed steps, one round"
    )
    add_harness_arguments(parser, CONFIGS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = _parser().parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.repeats = 1, 2, 1
    settings = BenchSettings(**{f.name: getattr(args, f.name) for f in fields(BenchSettings)})
    if args.child:
        result = run_config(args.child, json.loads(args.assets), settings)
        Path(args.child_out).write_text(json.dumps(result))
        return {args.child: result}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configs = selected_configs(args, CONFIGS)
    with tempfile.TemporaryDirectory(prefix="dpo_step_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        assets = prepare_assets(workdir, settings)
        sizes = model_sizes(assets["model"])
        runs = [run_child(__file__, BASELINE, "baseline (load only)", assets, settings, workdir)]
        for _ in range(args.repeats):  # round-robin, so every configuration sees the same load drift
            runs += [run_child(__file__, name, CONFIGS[name], assets, settings, workdir) for name in configs]
    results = pool_dpo_runs(runs)
    if "error" in results[BASELINE]:
        raise SystemExit(f"baseline child failed: {results[BASELINE]['stderr_tail']}")
    print(summarise(results, settings, sizes))
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps({"settings": asdict(settings), "sizes": sizes, "results": results}, indent=2)
        )
    return results


if __name__ == "__main__":
    main()
