"""GRPO training-step time, sampling time and peak memory: pivot vs TRL 1.16 `GRPOTrainer`, in one run.

Issue 16's benchmark. The vision-heavy tiny MLLM of `benchmarks/dpo_step.py` (a SigLIP tower wider and
deeper than the LLM, 256 tokens per image → `mlp2x_gelu` → a tiny Qwen2, saved as a plain HF
checkpoint), the same synthetic-world prompts (the MMPR converter's GRPO json), the same number of
prompts per step, G = 8 completions each of `--max_completion_length` tokens (temperature 1, top-p 1,
top-k off), the same rewards (exact match + format, llava.train.rewards), β 0 (no reference), the
`dapo` normalisation, μ 1, AdamW with a constant LR and grad-norm clip 1.0, fp32, for:

  (a) `PivotTrainer --loss_type grpo`: each prompt's image encoded once for sampling (the G samples
      share it through `inputs_embeds`) and once for scoring its G completions;
  (b) the same with `share_image_encoding False`: scoring encodes the image once per completion;
  (c) TRL's `GRPOTrainer` with a `LlavaProcessor` (the `qwen_1_5` chat template): `generate` with
      `pixel_values` runs the tower in the prefill of each of the G rows, and scoring encodes the
      image once per completion.

Each configuration runs in its own child process (a fresh model, `--repeats` rounds a, b, c, a, ...).
Step time is the interval between consecutive `on_step_end`s (fetch, sampling, rewards, forward,
backward, AdamW: pivot samples before `on_step_begin`, TRL inside the step, so begin→end would not
compare). Sampling time is the image encoding plus `generate`: pivot's `timing/sampling_s`, TRL's
`generate` calls timed. Peak memory: on CUDA `max_memory_allocated` above the loaded model, on CPU the
child's peak RSS minus that of a load-only baseline child.

Run: `python benchmarks/grpo_step.py` (`--quick` for a smoke run).
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.dpo_step import BenchSettings, model_sizes, prepare_assets  # noqa: E402
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
    "a": "PivotTrainer GRPO: image encoded once per group",
    "b": "PivotTrainer GRPO: image encoded per completion for scoring",
    "c": "TRL 1.16 GRPOTrainer",
}
REWARDS = ("exact_match", "format")


@dataclass
class GRPOBenchSettings:
    """Settings shared by every configuration (defaults: the full run)."""

    prompts: int = 2
    num_generations: int = 8
    max_completion_length: int = 16
    warmup: int = 1
    steps: int = 4
    learning_rate: float = 1e-6
    seed: int = 0
    device: str = "auto"
    threads: int = 1

    def __post_init__(self) -> None:
        if min(self.prompts, self.max_completion_length, self.steps) < 1 or self.num_generations < 2:
            raise ValueError(
                "--prompts, --max_completion_length, --steps must be >= 1 and --num_generations >= 2"
            )
        if self.warmup < 0 or self.threads < 0:
            raise ValueError("--warmup and --threads must be >= 0")

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    def model_settings(self) -> BenchSettings:
        """dpo_step's model and data settings, with enough records for every step."""
        return BenchSettings(batch_size=self.prompts, warmup=self.warmup, steps=self.steps, seed=self.seed)


class _Timer:
    """Consecutive `on_step_end` times and the time spent in sampling (CUDA synchronised)."""

    def __init__(self, cuda: bool) -> None:
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer.ends.append(timer.now())

            def on_step_end(self, args, state, control, **kwargs):
                timer.ends.append(timer.now())

        self.cuda = cuda
        self.ends: list[float] = []
        self.sampling: list[float] = []
        self.callback = Callback()

    def now(self) -> float:
        if self.cuda:
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def wrap(self, fn):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            start = self.now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sampling.append(self.now() - start)

        return timed

    def step_times(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def _common_args(s: GRPOBenchSettings, device: str, out: str) -> dict[str, Any]:
    return {
        "output_dir": out,
        "max_steps": s.total_steps,
        "learning_rate": s.learning_rate,
        "lr_scheduler_type": "constant",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "optim": "adamw_torch",
        "bf16": False,  # fp32 everywhere: TRL's GRPOConfig defaults to bf16 (slow autocast on most CPUs)
        "fp16": False,
        "gradient_checkpointing": False,  # TRL's GRPOConfig turns it on by default; pivot's runs here do not
        "beta": 0.0,
        "num_generations": s.num_generations,
        "max_completion_length": s.max_completion_length,
        "temperature": 1.0,
        "top_p": 1.0,
        "epsilon": 0.2,
        "num_iterations": 1,
        "gradient_accumulation_steps": 1,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": [],
        "dataloader_num_workers": 0,
        "disable_tqdm": True,
        "seed": s.seed,
        "use_cpu": device == "cpu",
    }


def _train_pivot(name, model, tokenizer, image_processor, records, s, device, timer, out):
    from llava.data.collator import PromptCollator
    from llava.data.dataset import MultimodalDataset
    from llava.model.image_tokens import image_token_counter
    from llava.train.args import PivotTrainingArguments
    from llava.train.trainer import PivotTrainer

    dataset = MultimodalDataset(
        records, tokenizer, image_processor, "qwen_1_5", image_token_counter(model.config), 4096
    )
    args = PivotTrainingArguments(
        **_common_args(s, device, out),
        loss_type="grpo",
        per_device_train_batch_size=s.prompts,
        loss_normalization="dapo",
        reward_funcs=list(REWARDS),
        share_image_encoding=name == "a",
    )
    trainer = PivotTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=PromptCollator(),
        processing_class=tokenizer,
        callbacks=[timer.callback],
    )
    loss = trainer.train().training_loss
    history = trainer.state.log_history
    timer.sampling = [row["timing/sampling_s"] for row in history if "timing/sampling_s" in row]
    rewards = [row["reward"] for row in history if "reward" in row]
    return {"train_loss": loss, "reward": statistics.fmean(rewards)}


def _trl_reward(name: str):
    from llava.train.rewards import REWARDS as REGISTRY

    def reward(prompts, completions, answer, answer_format, **kwargs):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        records = [{"answer": a, "answer_format": f} for a, f in zip(answer, answer_format)]
        return REGISTRY[name](texts, records)

    reward.__name__ = name
    return reward


def _train_trl(model, tokenizer, image_processor, records, s, device, timer, out):
    import datasets
    from transformers import LlavaProcessor
    from trl import GRPOConfig, GRPOTrainer

    from llava.data.images import load_image
    from llava.data.templates import IMAGE_PLACEHOLDER
    from llava.model.chat_template import QWEN_1_5_CHAT_TEMPLATE

    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=model.config.vision_config.patch_size,
        vision_feature_select_strategy=model.config.vision_feature_select_strategy,
        chat_template=QWEN_1_5_CHAT_TEMPLATE,
    )
    rows: dict[str, list] = {"prompt": [], "images": [], "answer": [], "answer_format": []}
    for record in records:  # TRL's vision format: string prompts, images put before the first user message
        rows["images"].append([load_image(path, record.id, record.source) for path in record.images])
        text = record.prompt.replace(f"{IMAGE_PLACEHOLDER}\n", "")
        rows["prompt"].append([{"role": "user", "content": text}])
        rows["answer"].append(record.answer)
        rows["answer_format"].append(record.answer_format)
    args = GRPOConfig(
        **_common_args(s, device, out),
        per_device_train_batch_size=s.prompts * s.num_generations,
        loss_type="dapo",
        top_k=0,
        shuffle_dataset=False,
    )
    model.generate = timer.wrap(model.generate)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=[_trl_reward(name) for name in REWARDS],
        args=args,
        train_dataset=datasets.Dataset.from_dict(rows),
        processing_class=processor,
        callbacks=[timer.callback],
    )
    loss = trainer.train().training_loss
    rewards = [row["reward"] for row in trainer.state.log_history if "reward" in row]
    return {"train_loss": loss, "reward": statistics.fmean(rewards)}


def run_config(name: str, assets: dict[str, str], s: GRPOBenchSettings) -> dict[str, Any]:
    inputs = load_config_inputs(
        name, assets["model"], (assets["grpo"], assets["world"], "prompt"), s.seed, s.threads, s.device
    )
    result = inputs.result
    if name != BASELINE:
        timer = _Timer(inputs.cuda)
        train = _train_trl if name == "c" else functools.partial(_train_pivot, name)
        with tempfile.TemporaryDirectory(prefix=f"grpo_step_{name}_") as out:
            result.update(train(*inputs.parts(), s, inputs.device, timer, out))
        steps = timer.step_times()
        if len(steps) != s.total_steps:
            raise RuntimeError(f"config {name}: timed {len(steps)} steps, expected {s.total_steps}")
        result["step_s"] = steps[s.warmup :]
        result["sampling_s"] = timer.sampling[s.warmup :]
    return add_peak_memory(inputs)


def summarise(results: dict[str, dict[str, Any]], s: GRPOBenchSettings, sizes: dict[str, int]) -> str:
    baseline = results[BASELINE]

    def memory(r):
        return memory_mb(r, baseline)

    lines = [
        f"device: {baseline['device_name']}, torch threads {baseline['threads']}, fp32; {s.prompts} prompts x "
        f"G {s.num_generations} x {s.max_completion_length} tokens per step, {s.warmup} warm-up + {s.steps} "
        "timed steps per run",
        f"model: SigLIP {sizes['vision_params'] / 1e6:.2f}M params ({sizes['vision_layers_used']} layers used), "
        f"projector {sizes['projector_params'] / 1e6:.2f}M, Qwen2 {sizes['llm_params'] / 1e6:.2f}M",
        "memory: "
        + (
            "CUDA max_memory_allocated above the model"
            if "peak_mb" in baseline
            else "peak RSS minus a load-only baseline"
        ),
        "",
        "| config | step (s, median) | sampling (s, median) | peak memory (MB) | mean reward | step / (a) "
        "| sampling / (a) | memory / (a) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    a = results.get("a", {})
    for name, title in CONFIGS.items():
        r = results.get(name, {})
        if "step_s" not in r:
            lines.append(f"| ({name}) {title} | not run: {r.get('error', 'not selected')} | | | | | | |")
            continue
        step, sampling = statistics.median(r["step_s"]), statistics.median(r["sampling_s"])
        ratios = ["n/a"] * 3
        if "step_s" in a:
            ratios = [
                f"{step / statistics.median(a['step_s']):.2f}x",
                f"{sampling / statistics.median(a['sampling_s']):.2f}x",
                f"{memory(r) / memory(a):.2f}x",
            ]
        lines.append(
            f"| ({name}) {title} | {step:.3f} | {sampling:.3f} | {memory(r):.0f} | {r['reward']:.3f} | "
            + " | ".join(ratios)
            + " |"
        )
    c = results.get("c", {})
    if "step_s" in a and "step_s" in c:
        speed = statistics.median(c["step_s"]) / statistics.median(a["step_s"])
        verdict = "meets" if speed >= 1.5 and memory(c) > memory(a) else "MISSES"
        lines += [
            "",
            f"(a) {verdict} the target vs TRL (>= 1.5x faster step, lower peak memory): {speed:.2f}x",
        ]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    defaults = GRPOBenchSettings()
    for f in fields(GRPOBenchSettings):
        value = getattr(defaults, f.name)
        parser.add_argument(f"--{f.name}", type=type(value), default=value, help=f"(default: {value})")
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 warm-up + 1 timed step, one round")
    add_harness_arguments(parser, CONFIGS)
    return parser


def main(argv: Sequence[str] | None = None) -> dict[str, dict[str, Any]]:
    args = _parser().parse_args(argv)
    if args.quick:
        args.warmup, args.steps, args.repeats = 1, 1, 1
    s = GRPOBenchSettings(**{f.name: getattr(args, f.name) for f in fields(GRPOBenchSettings)})
    if args.child:
        result = run_config(args.child, json.loads(args.assets), s)
        Path(args.child_out).write_text(json.dumps(result))
        return {args.child: result}
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    configs = selected_configs(args, CONFIGS)
    with tempfile.TemporaryDirectory(prefix="grpo_step_") as tmp:
        workdir = Path(args.workdir or tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        assets = prepare_assets(workdir, s.model_settings())
        assets["grpo"] = str(Path(assets["data"]).parent / "mmpr_grpo.json")
        sizes = model_sizes(assets["model"])
        runs = [run_child(__file__, BASELINE, "baseline (load only)", assets, s, workdir)]
        for _ in range(args.repeats):
            runs += [run_child(__file__, name, CONFIGS[name], assets, s, workdir) for name in configs]
    results = pool_runs(runs, concatenated=("step_s", "sampling_s"), averaged=("train_loss", "reward"))
    print(summarise(results, s, sizes))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"settings": vars(args), "runs": runs}, indent=2))
    return results


if __name__ == "__main__":
    main()
