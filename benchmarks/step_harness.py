"""The child-process harness the training-step benchmarks share (`dpo_step.py`, `grpo_step.py`).

Each configuration of a step benchmark trains in a fresh interpreter (`run_child`), so its peak memory
is its own; a load-only baseline child cancels the memory of imports and the loaded model. The child
loads the checkpoint, trains every part, reads its records (`load_config_inputs`) and ends its result
with the memory it peaked at (`add_peak_memory`); the parent pools the rounds (`pool_runs`).
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
from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

BASELINE = "baseline"


def resolve_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def import_stack() -> None:
    """Import every library any configuration uses, so import memory cancels against the baseline."""
    import datasets  # noqa: F401
    import transformers  # noqa: F401
    import trl  # noqa: F401

    import llava.train.trainer  # noqa: F401


@dataclass
class ConfigInputs:
    """What one configuration's child trains: the model (every part trainable) and its records."""

    model: Any
    tokenizer: Any
    image_processor: Any
    records: list
    device: str
    cuda: bool
    base_bytes: int
    result: dict[str, Any]

    def parts(self) -> tuple[Any, Any, Any, list]:
        """(model, tokenizer, image_processor, records): the leading arguments of a benchmark's train function."""
        return self.model, self.tokenizer, self.image_processor, self.records


def load_config_inputs(
    name: str, checkpoint: str, data: tuple[str, str, str], seed: int, threads: int, device_name: str
) -> ConfigInputs:
    """Seed, threads, the checkpoint on its device with every part trainable, and the records of
    `data` = (path, image folder, record kind); CUDA peak statistics reset after the load."""
    import torch
    import transformers

    from llava.data.mixture import load_records
    from llava.model.builder import load_model
    from llava.train.param_groups import parse_tunable_parts, set_trainable_parts

    import_stack()
    device = resolve_device(device_name)
    if threads:
        torch.set_num_threads(threads)
    transformers.set_seed(seed)
    model, tokenizer, image_processor = load_model(checkpoint)
    set_trainable_parts(model, parse_tunable_parts("mm_vision_tower,mm_mlp_adapter,mm_language_model"))
    model.to(device)
    path, image_folder, kind = data
    records = load_records(path, image_folder, kind, seed=seed)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    result = {
        "config": name,
        "device": device,
        "device_name": torch.cuda.get_device_name() if cuda else f"cpu ({os.cpu_count()} cores)",
        "threads": torch.get_num_threads(),
    }
    base_bytes = torch.cuda.memory_allocated() if cuda else 0
    return ConfigInputs(model, tokenizer, image_processor, records, device, cuda, base_bytes, result)


def add_peak_memory(inputs: ConfigInputs) -> dict[str, Any]:
    """The child's result with its peak memory: CUDA above the loaded model, and the process's peak RSS."""
    import torch

    result = inputs.result
    if inputs.cuda:
        result["peak_mb"] = (torch.cuda.max_memory_allocated() - inputs.base_bytes) / 2**20
    result["max_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return result


def memory_mb(result: dict[str, Any], baseline: dict[str, Any]) -> float:
    """Peak memory of a configuration: CUDA's above the model, else peak RSS above the baseline child's."""
    if "peak_mb" in result:
        return result["peak_mb"]
    return result["max_rss_mb"] - baseline["max_rss_mb"]


def run_child(script: str, name: str, title: str, assets: dict[str, str], settings, workdir: Path) -> dict:
    """Run configuration `name` of `script` in a fresh interpreter; its result, or the reason it failed."""
    out = workdir / f"result_{name}.json"
    cmd = [sys.executable, os.path.abspath(script), "--child", name, "--assets", json.dumps(assets)]
    cmd += ["--child_out", str(out), *(f"--{f.name}={getattr(settings, f.name)}" for f in fields(settings))]
    logger.info("running config %s: %s", name, title)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
        return {
            "config": name,
            "error": lines[-1] if lines else f"exit status {proc.returncode}",
            "stderr_tail": "\n".join(lines[-25:]),
        }
    return json.loads(out.read_text())


def pool_runs(
    runs: list[dict[str, Any]], concatenated: Iterable[str], averaged: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """Each configuration's rounds merged: the `concatenated` lists joined, memory the largest peak, the
    `averaged` values their mean; a configuration with a failed round reports that failure."""
    by_name: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        by_name.setdefault(run["config"], []).append(run)
    pooled: dict[str, dict[str, Any]] = {}
    for name, group in by_name.items():
        failed = [run for run in group if "error" in run]
        if failed:
            pooled[name] = failed[0]
            continue
        merged = {**group[0], "repeats": len(group)}
        for key in concatenated:
            if key in merged:
                merged[key] = [value for run in group for value in run[key]]
        for key in ("max_rss_mb", "peak_mb"):
            if key in merged:
                merged[key] = max(run[key] for run in group)
        for key in averaged:
            if key in merged:
                merged[key] = statistics.fmean(run[key] for run in group)
        pooled[name] = merged
    return pooled


def add_harness_arguments(parser: argparse.ArgumentParser, configs: Iterable[str]) -> None:
    """The flags every step benchmark has besides its settings: rounds, subset, folders, the child's."""
    names = ",".join(configs)
    parser.add_argument(
        "--repeats",
        type=int,
        default=2,
        help="run the configurations this many times in turn (a, b, ..., a, b, ...) and pool their steps",
    )
    parser.add_argument("--configs", default=names, help=f"comma-separated subset of {names} to run")
    parser.add_argument("--workdir", default=None, help="where to write model and data (default: a temp dir)")
    parser.add_argument("--json_out", default=None, help="also write every raw measurement to this JSON file")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--assets", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--child_out", default=None, help=argparse.SUPPRESS)


def selected_configs(args: argparse.Namespace, configs: Iterable[str]) -> list[str]:
    """`--configs` checked against the benchmark's configurations, and `--repeats` >= 1."""
    if args.repeats < 1:
        raise SystemExit(f"--repeats must be >= 1, got {args.repeats}")
    chosen = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in configs]
    if unknown:
        raise SystemExit(f"--configs: unknown {unknown}; choose from {sorted(configs)}")
    return chosen
