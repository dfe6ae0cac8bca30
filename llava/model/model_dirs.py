"""What a model directory holds, decided from its files before anything is loaded (issue 15).

`from_pretrained` of `LlavaForConditionalGeneration` on a folder that is not a LLaVA checkpoint (an
LLM-only folder, an exported `vision_encoder/`) does not fail: it builds a default-size random LLaVA
around whatever config it finds, which on CPU grows to tens of GB before the kernel kills it. Every
entry point that loads an MLLM checkpoint (training's `--model_name_or_path`, `analysis.gradcam
--checkpoint`) and every analysis that reads an encoder calls these checks first, so the wrong folder
is answered with one line naming it and saying what it is.

Kinds (`model_dir_kind`): `llava` (HF Llava / LLaVA-OneVision, this project's checkpoints),
`llava_next_original` (LLaVA-NeXT's own layout), `export` (llava.export output: export.json),
`vision` (a vision tower, e.g. an export's vision_encoder/), `llm` (a causal LM), `other`.
"""

from __future__ import annotations

import re
from pathlib import Path

from llava.file_checks import FileFormatError, check_safetensors_in, read_json

LLAVA_MODEL_TYPES = ("llava", "llava_onevision")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_hub_id(name: str) -> bool:
    """`org/name` that is not a local path: passed to the hub (checked there, not here)."""
    return bool(HUB_ID.match(name)) and not Path(name).exists()


def read_config(path: Path) -> dict:
    """config.json of a model directory, as a dict; a parse error names the file."""
    return read_json(path / "config.json", "model config")


def model_dir_kind(path: str | Path) -> str:
    """One of the kinds of the module docstring, for an existing directory."""
    path = Path(path)
    raw = read_config(path) if (path / "config.json").is_file() else {}
    if raw.get("model_type") in LLAVA_MODEL_TYPES:  # a run's OUTPUT_DIR also holds export.json
        return "llava"
    if (path / "export.json").is_file():
        return "export"
    if not raw:
        return "other"
    model_type = raw.get("model_type")
    if "mm_vision_tower" in raw or "mm_projector_type" in raw:
        return "llava_next_original"
    architectures = raw.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "llm"
    if model_type == "pivot_multi_tower" or "image_size" in raw or "vision_config" in raw:
        return "vision"
    if "vocab_size" in raw:
        return "llm"
    return "other"


def has_weights(path: Path) -> bool:
    return any(any(path.glob(pattern)) for pattern in WEIGHT_PATTERNS)


def llava_checkpoint_problem(path: str | Path, flag: str) -> str | None:
    """None if `path` is a loadable LLaVA checkpoint (or a hub id), else the one-line reason it is not."""
    name = str(path)
    if is_hub_id(name):
        return None
    path = Path(path)
    if not path.exists():
        return f"{flag} {name}: no such directory (a LLaVA checkpoint directory or an org/name hub id)."
    if not path.is_dir():
        return f"{flag} {name}: a file, not a checkpoint directory."
    kind = model_dir_kind(path)
    what = {
        "export": "an exported encoder (llava.export: export.json, vision_encoder/, projector/), not an MLLM",
        "vision": "a vision encoder alone (no LLM, no projector), not an MLLM",
        "llm": "an LLM-only checkpoint (no vision tower, no projector); build an MLLM from it with "
        "--llm and --vision_tower instead",
        "llava_next_original": "an original LLaVA-NeXT checkpoint (mm_vision_tower keys), which transformers' "
        "Llava classes do not load",
        "other": "not a model checkpoint (no config.json of a LLaVA model)",
    }
    if kind != "llava":
        return f"{flag} {name}: {what[kind]}; give a LLaVA checkpoint (a training run's OUTPUT_DIR or checkpoint-N)."
    if not has_weights(path):
        return f"{flag} {name}: a LLaVA config.json but no weight files (an incomplete or interrupted save)."
    try:
        check_safetensors_in(path)
    except FileFormatError as error:
        return f"{flag} {name}: {error}"
    return None


def require_llava_checkpoint(path: str | Path, flag: str = "--model_name_or_path") -> None:
    problem = llava_checkpoint_problem(path, flag)
    if problem:
        raise ValueError(problem)


def encoder_dir_problem(path: str | Path) -> str | None:
    """Reason a directory without export.json cannot be read as a vision encoder, or None."""
    kind = model_dir_kind(path)
    if kind in ("llava", "llava_next_original"):
        return (
            f"{path}: an MLLM checkpoint without export.json (saved before exports were written, or with "
            f"--export_encoder False); export its encoder first: python -m llava.export {path} OUT_DIR, "
            "then give OUT_DIR."
        )
    if kind == "llm":
        return f"{path}: a language model, not a vision encoder (give an exported encoder or a vision model)."
    return None
