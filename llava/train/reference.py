"""Reference-model log-probabilities, precomputed in one pass and cached on disk by sample id.

DPO needs log πref(y|x) for the chosen and rejected response of every pair. Instead of keeping a
frozen copy of the model in memory for the whole run, the trainer can score every pair once before
training (the policy at step 0 *is* the reference), with images, and read the numbers back by
sample id. The cache is a JSON file `{"reference": ..., "logps": {id: [chosen, rejected]}}` where
`reference` fingerprints what produced the numbers (starting model and its weight files, model
flags, dtype, data, template, length limit; llava.train.train `reference_fingerprint`); a cache made
for something else, or lacking any id of the dataset, is an error, not a silent reuse. The cache is
written atomically (a temporary file in the same directory, then `os.replace`), so a reader never
sees a half-written file.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from llava.file_checks import FileFormatError, read_json
from llava.train.logps import pair_logps

logger = logging.getLogger(__name__)


def compute_reference_logps(
    model: PreTrainedModel,
    dataset: Dataset,
    collator,
    batch_size: int,
    device: torch.device | str,
    share_image_encoding: bool = True,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, tuple[float, float]]:
    """Score every (chosen, rejected) pair of `dataset` with `model` in eval mode, no gradients.

    `autocast_dtype` runs the forward under `torch.autocast` in that dtype: give the precision training
    uses (llava.train.args `autocast_dtype`), so the reference equals the policy at step 0.
    """
    was_training = model.training
    model.eval()
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collator)
    logps: dict[str, tuple[float, float]] = {}
    device_type = torch.device(device).type
    autocast = torch.autocast(device_type, dtype=autocast_dtype) if autocast_dtype else nullcontext()
    with torch.no_grad(), autocast:
        for batch in tqdm(loader, desc="reference log-probs", unit="batch"):
            ids = batch.pop("sample_ids")
            batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
            chosen, rejected, _, _ = pair_logps(model, batch, share_image_encoding)
            for sample_id, c, r in zip(ids, chosen.tolist(), rejected.tolist()):
                logps[sample_id] = (c, r)
    model.train(was_training)
    return logps


def save_reference_logps(
    path: str | Path, logps: dict[str, tuple[float, float]], reference: str | dict
) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "reference": reference,
        "num_samples": len(logps),
        "logps": {k: list(v) for k, v in logps.items()},
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(payload))
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_reference_logps(
    path: str | Path, required_ids: list[str], reference: str | dict | None = None
) -> dict[str, tuple[float, float]]:
    """Read a cache; check it was made for `reference` (when given) and covers every id of the run."""
    payload = read_json(path, "reference log-prob cache")
    try:
        logps = {k: (float(v[0]), float(v[1])) for k, v in payload["logps"].items()}
    except (AttributeError, KeyError, TypeError, IndexError, ValueError) as error:
        raise FileFormatError(
            path, "reference log-prob cache", f"no 'logps' of [chosen, rejected] pairs: {error!r}"
        ) from error
    if reference is not None and payload.get("reference") != reference:
        raise ValueError(
            f"reference log-prob cache {path} was made for {payload.get('reference')!r}, not for this run "
            f"({reference!r}); delete it to recompute, or point --ref_logps_path elsewhere."
        )
    missing = [i for i in required_ids if i not in logps]
    if missing:
        raise ValueError(
            f"reference log-prob cache {path} lacks {len(missing)} of {len(required_ids)} sample ids "
            f"(first: {missing[:3]}); delete it to recompute, or point --ref_logps_path elsewhere."
        )
    logger.info(
        "loaded reference log-probs for %d samples from %s (reference: %s)",
        len(logps),
        path,
        payload.get("reference"),
    )
    return logps


def lookup(
    logps: dict[str, tuple[float, float]], ids: list[str], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected reference log-probs of a batch, as float32 tensors [B]."""
    chosen = torch.tensor([logps[i][0] for i in ids], dtype=torch.float32, device=device)
    rejected = torch.tensor([logps[i][1] for i in ids], dtype=torch.float32, device=device)
    return chosen, rejected
