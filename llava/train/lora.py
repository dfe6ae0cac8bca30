"""LoRA and QLoRA training through peft, for every stage (issue 18; LLaVA-NeXT `--lora_enable`, TRL `peft_config`).

What a LoRA run trains, part by part (`--mm_tunable_parts`, llava.model.parts):
- `mm_language_model`: LoRA on the LLM's `--lora_target_modules` (default: the attention and MLP
  projections q,k,v,o,gate,up,down), matched under the language model only; its embeddings and LM head
  stay frozen (the LLM is never trained fully in a LoRA run).
- `mm_vision_tower`: with `--lora_vision`, LoRA on every linear layer of the tower on the feature path;
  its adapters keep `.vision_tower.` in their names, so `--mm_vision_tower_lr` sets their LR through the
  per-module groups (llava.train.param_groups). Without it the tower is trained fully.
- `mm_mlp_adapter`: the projector is trained fully (OneVision's `image_newline` too).
- parts not named stay frozen; the model layer's freezing (unused tower parameters, Stage 3's encoder
  and reused projector layers) holds inside the fully trained parts too.
Fully trained modules are peft `modules_to_save`: the trained copy runs, the original stays untouched
beside it. LLaVA-NeXT's bug #508 (LoRA plus tunable parts silently trained the whole model) is what
`describe_trainable` logs and the tests pin: the trainable names are exactly these.

Preference losses with `--reference live` use the base model as the reference: `adapters_disabled`
disables every adapter and every `modules_to_save` copy (the originals run), in eval mode and without
gradients, then restores the trainable flags peft resets; no copy of the model is made.
`--reference precomputed` scores the pairs before training, when the adapters are still zero.

Checkpoints hold the adapters and fully trained parts (peft's `adapter_model.safetensors`), the base
config and, in `adapter_config.json`, the base checkpoint they apply to: `--model_name_or_path`, or
`OUTPUT_DIR/lora_base`, written once before training when the model was built here (from `--llm` and
`--vision_tower`, or `--stage3_source`). Resume loads the adapters strictly. The exports (llava.export)
and `load_model` merge the adapters; `--merge_lora_into OUT` writes a merged full checkpoint.

QLoRA (`--bits 4|8`): the LLM's linear layers are quantized with bitsandbytes (nf4 with double
quantization, or int8) after the full-precision base is saved, so merges start from full-precision
weights; the tower and projector are not quantized. It needs CUDA and is refused elsewhere.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, set_peft_model_state_dict
from safetensors.torch import load_file
from transformers import PreTrainedModel

from llava.model.adapters import ADAPTER_WEIGHTS, base_llava, is_lora_checkpoint, load_lora_checkpoint
from llava.model.builder import save_model
from llava.model.parts import TUNABLE_PARTS, part_of

logger = logging.getLogger(__name__)

LLM_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULLY_TRAINED_MODULES = {"mm_mlp_adapter": "multi_modal_projector", "mm_vision_tower": "vision_tower"}
BASE_DIR = "lora_base"
BITS = (4, 8)


@dataclass
class LoraArguments:
    """LoRA flags of `python -m llava.train.train` (LLaVA-NeXT names; defaults r 64, alpha 16, dropout 0.05)."""

    lora_enable: bool = field(
        default=False, metadata={"help": "Train LoRA adapters instead of full weights (llava.train.lora)."}
    )
    lora_r: int = field(default=64, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=16, metadata={"help": "LoRA alpha (scale alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default=",".join(LLM_TARGETS),
        metadata={
            "help": "Comma-separated LLM linear-layer names adapted (matched under the language model)."
        },
    )
    lora_vision: bool = field(
        default=False,
        metadata={"help": "Also adapt the vision tower (its linear layers; LR: --mm_vision_tower_lr)."},
    )
    bits: int | None = field(
        default=None, metadata={"help": "QLoRA: quantize the LLM to 4 or 8 bits (bitsandbytes, CUDA only)."}
    )
    merge_lora_into: str | None = field(
        default=None, metadata={"help": "After training, write a merged full checkpoint (plain Llava) here."}
    )

    def __post_init__(self) -> None:
        lora_only = [
            flag
            for flag, value in (
                ("--lora_vision", self.lora_vision),
                ("--bits", self.bits),
                ("--merge_lora_into", self.merge_lora_into),
            )
            if value
        ]
        if lora_only and not self.lora_enable:
            raise ValueError(f"{', '.join(lora_only)} need --lora_enable.")
        if self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(
                f"--lora_r {self.lora_r} --lora_alpha {self.lora_alpha} --lora_dropout {self.lora_dropout}: "
                "need r >= 1, alpha > 0 and 0 <= dropout < 1."
            )
        if not self.target_modules:
            raise ValueError("--lora_target_modules is empty; give comma-separated linear-layer names.")
        if self.bits is not None:
            if self.bits not in BITS:
                raise ValueError(f"--bits {self.bits}: choose one of {BITS} (QLoRA).")
            if not torch.cuda.is_available():
                raise ValueError(
                    f"--bits {self.bits} (QLoRA) quantizes the LLM with bitsandbytes, which needs a CUDA GPU; "
                    "none is available here. Drop --bits to train LoRA adapters on full-precision weights."
                )
            if importlib.util.find_spec("bitsandbytes") is None:
                raise ValueError(f"--bits {self.bits} (QLoRA) needs bitsandbytes: pip install bitsandbytes.")

    @property
    def target_modules(self) -> tuple[str, ...]:
        return tuple(name.strip() for name in self.lora_target_modules.split(",") if name.strip())


# ---- what is adapted, what is trained fully -----------------------------------------------------
def lora_targets(model: PreTrainedModel, parts: tuple[str, ...], args: LoraArguments) -> list[str]:
    """Full names of the linear layers that get adapters (the module docstring's rules)."""
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) and not _is_quantized_linear(module):
            continue
        if ".language_model." in f".{name}." and "mm_language_model" in parts:
            if name.rsplit(".", 1)[-1] in args.target_modules:
                targets.append(name)
        elif ".vision_tower." in f".{name}." and args.lora_vision and module.weight.requires_grad:
            targets.append(name)  # a trainable tower weight is on the feature path (llava.model.parts)
    return targets


def _is_quantized_linear(module: torch.nn.Module) -> bool:
    return type(module).__name__ in ("Linear4bit", "Linear8bitLt")


def adapted_parts(parts: tuple[str, ...], args: LoraArguments) -> tuple[str, ...]:
    """The parts trained through adapters; the other parts in `parts` are trained fully."""
    adapted = ("mm_language_model",) if "mm_language_model" in parts else ()
    return adapted + (("mm_vision_tower",) if args.lora_vision else ())


def check_parts(parts: tuple[str, ...], args: LoraArguments) -> None:
    if args.lora_vision and "mm_vision_tower" not in parts:
        raise ValueError(
            f"--lora_vision adapts the vision tower, but --mm_tunable_parts {','.join(parts)} freezes it: add "
            "mm_vision_tower, or drop --lora_vision."
        )
    if not adapted_parts(parts, args):
        raise ValueError(
            f"--lora_enable with --mm_tunable_parts {','.join(parts)} adapts nothing: LoRA goes on the LLM "
            "(mm_language_model) and, with --lora_vision, the tower; train other parts without --lora_enable."
        )


def apply_lora(model: PreTrainedModel, parts: tuple[str, ...], args: LoraArguments) -> PeftModel:
    """Wrap `model` (its trainable parts already set, llava.model.parts) in a PeftModel: adapters on the
    adapted parts, the other asked-for parts trained fully, the model layer's freezing kept."""
    check_parts(parts, args)
    trainable_before = {name for name, param in model.named_parameters() if param.requires_grad}
    full = tuple(p for p in parts if p not in adapted_parts(parts, args))
    targets = lora_targets(model, parts, args)
    if "mm_language_model" in parts and not any(".language_model." in f".{t}" for t in targets):
        names = sorted(
            {
                n.rsplit(".", 1)[-1]
                for n, m in model.named_modules()
                if ".language_model." in f".{n}." and isinstance(m, torch.nn.Linear)
            }
        )
        raise ValueError(
            f"--lora_target_modules {args.lora_target_modules!r} names no linear layer of the LLM; its linear "
            f"layers are named {names}."
        )
    config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=targets,
        modules_to_save=[FULLY_TRAINED_MODULES[p] for p in full if p in FULLY_TRAINED_MODULES] or None,
        bias="none",
    )
    peft_model = get_peft_model(model, config)
    for name, param in peft_model.named_parameters():
        if ".lora_" in name:
            continue
        plain = plain_name(name)
        keep = plain in trainable_before and part_of(plain) in full and ".original_module." not in name
        param.requires_grad_(keep)
    logger.info(describe_trainable(peft_model))
    return peft_model


def plain_name(name: str) -> str:
    """A PeftModel parameter's name in the plain model (wrapper levels removed)."""
    name = name.removeprefix("base_model.model.")
    for level in (".modules_to_save.default.", ".original_module.", ".base_layer."):
        name = name.replace(level, ".")
    return name


def describe_trainable(model: torch.nn.Module) -> str:
    """The real trainable set: parameters per part, through adapters and fully trained."""
    counts = {(part, kind): 0 for part in TUNABLE_PARTS for kind in ("adapters", "full")}
    total = trainable = 0
    for name, param in model.named_parameters():
        total += param.numel()
        if param.requires_grad:
            trainable += param.numel()
            counts[(part_of(plain_name(name)), "adapters" if ".lora_" in name else "full")] += param.numel()
    lines = [
        f"LoRA trainable parameters: {trainable:,} of {total:,} ({100 * trainable / max(total, 1):.2f}%)"
    ]
    for part in TUNABLE_PARTS:
        lines.append(f"  {part:<18} adapters={counts[(part, 'adapters')]:,} full={counts[(part, 'full')]:,}")
    return "\n".join(lines)


# ---- the reference model ------------------------------------------------------------------------
def peft_model_of(model: torch.nn.Module) -> PeftModel | None:
    """The PeftModel inside a DDP/DeepSpeed wrapper (`.module`), or None for a model without adapters."""
    model = model.module if hasattr(model, "module") else model
    return model if isinstance(model, PeftModel) else None


@contextmanager
def adapters_disabled(model: torch.nn.Module):
    """The base model (adapters and trained copies off), in eval mode, without gradients; yields it."""
    peft_model = peft_model_of(model)
    flags = [(param, param.requires_grad) for param in peft_model.parameters()]
    was_training = peft_model.training
    peft_model.eval()
    try:
        with peft_model.disable_adapter(), torch.no_grad():
            yield peft_model
    finally:
        peft_model.train(was_training)
        for param, flag in flags:  # enabling the adapters again sets every trained copy trainable
            param.requires_grad_(flag)


# ---- base checkpoint, quantization, checkpoints ------------------------------------------------
def lora_base(model_name_or_path: str | None, output_dir: str) -> tuple[str, bool]:
    """(base checkpoint the adapters apply to, whether it must be written): --model_name_or_path when it is
    a full checkpoint, else OUTPUT_DIR/lora_base (kept when a resumed run finds it)."""
    if model_name_or_path and not is_lora_checkpoint(model_name_or_path):
        return str(Path(model_name_or_path).resolve()), False
    base = Path(output_dir, BASE_DIR).resolve()
    return str(base), not (base / "config.json").exists()


def prepare_lora(
    model: PreTrainedModel,
    tokenizer,
    image_processor,
    parts: tuple[str, ...],
    args: LoraArguments,
    model_name_or_path: str | None,
    output_dir: str,
    is_main_process: bool = True,
) -> PeftModel:
    """Save the base when needed, quantize for QLoRA, wrap with adapters; the returned model trains."""
    base, write = lora_base(model_name_or_path, output_dir)
    if write and is_main_process:
        save_model(model, tokenizer, image_processor, base)
        logger.info("saved the LoRA base model to %s", base)
    if args.bits is not None:
        quantize_llm(model, args.bits)
    peft_model = apply_lora(model, parts, args)
    peft_model.peft_config["default"].base_model_name_or_path = base
    return peft_model


def quantize_llm(model: PreTrainedModel, bits: int) -> None:
    """Replace the LLM body's linear layers by bitsandbytes 4-bit (nf4, double quant) or 8-bit layers on CUDA."""
    import bitsandbytes as bnb

    compute_dtype = model.dtype if model.dtype != torch.float32 else torch.bfloat16
    llm = base_llava(model).model.language_model
    for name, module in list(llm.named_modules()):
        if not isinstance(module, torch.nn.Linear):
            continue
        parent = llm.get_submodule(name.rsplit(".", 1)[0]) if "." in name else llm
        if bits == 4:
            layer = bnb.nn.Linear4bit(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                compute_dtype=compute_dtype,
                compress_statistics=True,
                quant_type="nf4",
            )
            layer.weight = bnb.nn.Params4bit(
                module.weight.data.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4"
            )
        else:
            layer = bnb.nn.Linear8bitLt(
                module.in_features, module.out_features, bias=module.bias is not None, has_fp16_weights=False
            )
            layer.weight = bnb.nn.Int8Params(
                module.weight.data.cpu(), requires_grad=False, has_fp16_weights=False
            )
        if module.bias is not None:
            layer.bias = torch.nn.Parameter(module.bias.data.to(compute_dtype), requires_grad=False)
        setattr(parent, name.rsplit(".", 1)[-1], layer.cuda())
    logger.info("QLoRA: the LLM's linear layers are %d-bit (bitsandbytes)", bits)


def save_lora_extras(model: torch.nn.Module, output_dir: str | Path) -> None:
    """Next to peft's adapter files: the base config (with pivot_* keys), so a LoRA checkpoint directory
    names its loss and loads like any checkpoint (llava.model.builder `load_model`)."""
    peft_model = peft_model_of(model)
    if peft_model is not None:
        base_llava(peft_model).config.save_pretrained(str(output_dir))


def load_adapter_checkpoint(model: torch.nn.Module, checkpoint: str | Path) -> None:
    """Load a LoRA checkpoint's adapters and fully trained parts into the running PeftModel, strictly."""
    peft_model = peft_model_of(model)
    state = load_file(os.path.join(checkpoint, ADAPTER_WEIGHTS))
    result = set_peft_model_state_dict(peft_model, state)
    expected = {name for name, param in peft_model.named_parameters() if param.requires_grad}
    missing = sorted(expected & set(result.missing_keys))
    if missing or result.unexpected_keys:
        raise ValueError(
            f"LoRA checkpoint {checkpoint} does not match the model: missing {missing[:5]}, "
            f"unexpected {list(result.unexpected_keys)[:5]}"
        )
    logger.info("loaded %d adapter tensors from %s", len(state), checkpoint)


def merge_lora_into(checkpoint: str | Path, out_dir: str | Path) -> Path:
    """Write a merged full checkpoint (a plain Llava model) of a LoRA checkpoint directory."""
    model, tokenizer, image_processor = load_lora_checkpoint(checkpoint)
    save_model(model, tokenizer, image_processor, out_dir)
    (Path(out_dir) / "merged_from.json").write_text(json.dumps({"lora_checkpoint": str(checkpoint)}) + "\n")
    logger.info("merged LoRA checkpoint %s into %s", checkpoint, out_dir)
    return Path(out_dir)
