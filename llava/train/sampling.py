"""The matched-sample sampler shared by every loss type, and the `sample_order.jsonl` log.

SFT and DPO runs must see the same samples in the same order (the paper's controlled comparison; the
reference code used a length-grouped sampler for SFT and a random one for DPO). `MatchedSampler`
orders the samples of each epoch by a seeded hash of (seed, epoch, sample id): the order depends only
on the ids, never on the loss, the model, the number of processes or the positions of the records. So
when the two runs' record sets differ (e.g. `--skip_invalid` dropped a pair whose rejected reply is too
long, which only the DPO run checks), the ids they share still come in the same relative order instead
of every step changing, as a permutation of positions (`randperm(N)`) would. Duplicate ids are told
apart by their occurrence number (first, second, ... in record order); ties of the 64-bit hash, which
practically never happen, go to the lower index. Every optimizer step's sample ids are appended to
`<output_dir>/sample_order.jsonl`, so two runs can be compared line by line.

`--group_by_length` (`grouped_order`): the matched order is cut into mega-batches of one optimizer step's
samples (per-device batch x accumulation x processes, the LLaVA `LengthGroupedSampler` mega-batch), and
each is sorted by descending length, ties kept in the matched order. The length is one both runs of a
comparison share (the DPO record's prompt + longer reply, llava.data.prepared), so SFT and DPO still see
identical ids in identical order, and each step's micro-batches hold samples of similar length.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Sampler

SAMPLE_ORDER_FILE = "sample_order.jsonl"


def sample_key(seed: int, epoch: int, sample_id: str, occurrence: int = 0) -> int:
    """The 64-bit sort key of one sample in one epoch (blake2b, so independent of PYTHONHASHSEED)."""
    text = f"{seed}\x1f{epoch}\x1f{occurrence}\x1f{sample_id}".encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big")


def matched_order(ids: Sequence[str], seed: int, epoch: int) -> list[int]:
    """Indices of `ids` in the epoch's order: ascending `sample_key`, ties broken by index."""
    seen: Counter[str] = Counter()
    keys = np.empty(len(ids), dtype=np.uint64)
    for index, sample_id in enumerate(ids):
        keys[index] = sample_key(seed, epoch, sample_id, seen[sample_id])
        seen[sample_id] += 1
    return np.argsort(keys, kind="stable").tolist()


def grouped_order(
    ids: Sequence[str], lengths: Sequence[int], seed: int, epoch: int, mega_batch: int
) -> list[int]:
    """`matched_order`, sorted by descending `lengths` within consecutive mega-batches of `mega_batch`."""
    if len(lengths) != len(ids):
        raise ValueError(f"{len(lengths)} lengths for {len(ids)} samples")
    if mega_batch < 1:
        raise ValueError(f"mega_batch must be >= 1, got {mega_batch}")
    order = np.asarray(matched_order(ids, seed, epoch), dtype=np.int64)
    lengths = np.asarray(lengths)
    out = []
    for start in range(0, len(order), mega_batch):
        chunk = order[start : start + mega_batch]
        out.append(chunk[np.argsort(-lengths[chunk], kind="stable")])
    return np.concatenate(out).tolist() if out else []


class MatchedSampler(Sampler[int]):
    """Samples ordered by a seeded hash of their ids, reshuffled per epoch via `set_epoch`; with
    `lengths` and `mega_batch`, length-grouped within mega-batches (`grouped_order`)."""

    def __init__(
        self,
        ids: Sequence[str],
        seed: int,
        lengths: Sequence[int] | None = None,
        mega_batch: int | None = None,
    ) -> None:
        self.ids = [str(sample_id) for sample_id in ids]
        self.seed = seed
        self.epoch = 0
        self.lengths = lengths
        self.mega_batch = mega_batch
        if (lengths is None) != (mega_batch is None):
            raise ValueError("length grouping needs both lengths and mega_batch")

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self) -> Iterator[int]:
        if self.lengths is not None:
            return iter(grouped_order(self.ids, self.lengths, self.seed, self.epoch, self.mega_batch))
        return iter(matched_order(self.ids, self.seed, self.epoch))


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
