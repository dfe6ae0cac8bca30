"""Running mean of MPO's BCO reward shift δ, as InternVL's MPO trainer keeps it (TRL 0.10 `RunningMoments`).

InternVL's MPO (the paper's MPO) runs on TRL 0.10's DPOTrainer, whose `bco_pair` loss updates a
`RunningMoments` with the micro-batch's mean reward (chosen and rejected, β·log πθ/πref, detached) and
subtracts the running mean *after* that update. Across ranks each update sees every rank's mean at once
(TRL's `get_global_statistics`: mean and population variance over the world, count = world size). The
update is Chan et al.'s parallel mean/variance merge, initial count 1e-24 (so the first mean is the
first batch's). Here the state only advances on training micro-batches (TRL 0.10 also advanced it during
evaluation, so an eval pass shifted later training losses), and it is saved with every checkpoint as
`running_moments.json`, so a resumed run continues with the exact δ of an uninterrupted one.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

FILENAME = "running_moments.json"


@dataclass
class RunningMoments:
    """Running mean / variance of a stream of batch statistics (TRL 0.10 semantics)."""

    mean: float = 0.0
    std: float = 1.0
    var: float = 1.0
    count: float = 1e-24

    @torch.no_grad()
    def update(self, xs: torch.Tensor) -> None:
        """Merge the values `xs` (already gathered over ranks) into the running moments."""
        xs = xs.detach().double().flatten()
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs, unbiased=False)
        delta = xs_mean.item() - self.mean
        total = self.count + xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / total
        new_var = (old_sum + xs_var.item() * xs_count) / total
        self.mean += delta * xs_count / total
        self.std = (new_var * total / (total - 1)) ** 0.5 if total > 1 else float("nan")
        self.var = new_var
        self.count = total

    def save(self, directory: str | os.PathLike) -> None:
        path = Path(directory) / FILENAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, sort_keys=True) + "\n")
        tmp.replace(path)

    @classmethod
    def load(cls, directory: str | os.PathLike) -> RunningMoments:
        path = Path(directory) / FILENAME
        try:
            return cls(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError) as err:
            raise ValueError(
                f"{path}: cannot read MPO's running reward mean ({err}); this checkpoint was written by an "
                "MPO run with --bco_delta running, so resume needs the file intact."
            ) from err
