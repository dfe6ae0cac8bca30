"""Reading what checkpoints and exports hold: checkpoint tensors by prefix, exported projectors, `export.json`.

The model layer's side of the exported-encoder format (docs/CONTRACTS.md §1): Stage 3
(llava.model.stage3) reads exports and checkpoint tensors; the exporters (llava.export, llava.export_io)
write them. Keeping the readers here lets the model layer read exports without importing the export
layer (data flows model → export → Stage-3 model, not back).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

FORMAT_VERSION = 1
MULTI_TOWER_TYPE = "pivot_multi_tower"
TOWER_PREFIXES = ("model.vision_tower.", "vision_tower.")
PROJECTOR_PREFIXES = ("model.multi_modal_projector.", "multi_modal_projector.")


def load_projector(projector_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(config, state dict) of an exported `projector/` directory."""
    path = Path(projector_dir)
    return json.loads((path / "config.json").read_text()), load_file(str(path / "model.safetensors"))


def read_export(export_dir: str | Path) -> dict:
    """`export.json` of an export directory, checked for the contract's format version."""
    path = Path(export_dir) / "export.json"
    if not path.exists():
        raise FileNotFoundError(f"{export_dir}: no export.json (not an exported encoder; see llava.export).")
    meta = json.loads(path.read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}.")
    return meta


def _checkpoint_files(checkpoint: Path) -> list[Path]:
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(
            f"{checkpoint}: no *.safetensors weights (export reads safetensors checkpoints only)."
        )
    return files


def read_tensors(checkpoint: Path, prefixes: tuple[str, ...]) -> dict[str, dict[str, torch.Tensor]]:
    """Tensors under each prefix (prefix stripped), reading only those keys."""
    found: dict[str, dict[str, torch.Tensor]] = {p: {} for p in prefixes}
    for file in _checkpoint_files(checkpoint):
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            for key in handle.keys():  # noqa: SIM118 (safe_open handles are not dicts)
                prefix = next((p for p in prefixes if key.startswith(p)), None)
                if prefix is not None:
                    found[prefix][key[len(prefix) :]] = handle.get_tensor(key)
    return found
