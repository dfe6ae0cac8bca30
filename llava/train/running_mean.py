"""Running mean of MPO's BCO reward shift δ, as InternVL's MPO trainer keeps it (TRL 0.10 `RunningMoments`).

InternVL's MPO (the paper's MPO) runs on TRL 0.10's DPOTrainer, whose `bco_pair` loss updates a
`RunningMoments` with the micro-batch's mean reward (chosen and rejected, β·log πθ/πref, detached) and
subtracts the running mean *after* that update. Across ranks each update sees every rank's mean at once
(TRL's `get_global_statistics`: count = world size). Only the mean enters the loss, so only the mean and
its count are kept (TRL's merge of the variance and std feeds nothing); TRL's initial count of 1e-24
vanishes in float64, so it starts at 0. The state only advances on training micro-batches (TRL 0.10
also advanced it during evaluation, so an eval pass shifted later training losses), and it is saved
with every checkpoint as `bco_running_mean.json`, so a resumed run continues with the exact δ of an
uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FILENAME = "bco_running_mean.json"


@dataclass
class RunningMean:
    """Mean of every value merged so far, each update weighted by its number of values."""

    mean: float = 0.0
    count: int = 0

    def update(self, xs: torch.Tensor) -> None:
        """Merge the values `xs` (already gathered over ranks) into the running mean."""
        xs = xs.detach().double().flatten()
        self.count += xs.numel()
        self.mean += (xs.mean().item() - self.mean) * xs.numel() / self.count

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / FILENAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RunningMean:
        path = Path(directory) / FILENAME
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"{path}: cannot read MPO's running reward mean ({err}); this checkpoint was written by an "
                "MPO run with --bco_delta running, so resume needs the file intact."
            ) from err
