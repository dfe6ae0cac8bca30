"""The matched-sample sampler shared by every loss type, and the `sample_order.jsonl` log.

SFT and DPO runs must see the same samples in the same order (the paper's controlled comparison; the
reference code used a length-grouped sampler for SFT and a random one for DPO). `MatchedSampler` is
a seeded permutation per epoch that depends only on (seed, epoch, dataset length), never on the loss
or the model. Every optimizer step's sample ids are appended to `<output_dir>/sample_order.jsonl`,
so two runs can be compared line by line.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import Sampler

SAMPLE_ORDER_FILE = "sample_order.jsonl"


class MatchedSampler(Sampler[int]):
    """Seeded random permutation, reshuffled per epoch via `set_epoch` (same for every loss type)."""

    def __init__(self, length: int, seed: int) -> None:
        self.length = length
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.length, generator=generator).tolist())


class SampleOrderLog:
    """Append-only `step → ids` log that survives resume (later steps are dropped, then re-logged)."""

    def __init__(self, output_dir: str | Path) -> None:
        self.path = Path(output_dir) / SAMPLE_ORDER_FILE

    def truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        keep = [
            line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= step
        ]
        self.path.write_text("".join(f"{line}\n" for line in keep))

    def append(self, step: int, epoch: float, ids: list[str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps({"step": step, "epoch": epoch, "ids": ids}) + "\n")


def read_sample_order(output_dir: str | Path) -> list[dict]:
    path = Path(output_dir) / SAMPLE_ORDER_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line]
