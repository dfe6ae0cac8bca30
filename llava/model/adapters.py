"""LoRA adapters on the MLLM (peft): plain weights without touching the model, and LoRA checkpoints loaded merged.

A LoRA run (llava.train.lora) wraps the Llava model in a `peft.PeftModel`. LoRA layers replace the
adapted `nn.Linear`s in place; each fully trained part (`modules_to_save`: the projector, or the vision
tower when it is trained without adapters) becomes a `ModulesToSaveWrapper` holding the untouched
original next to the trained copy, so disabling the adapters gives back the whole base model. A LoRA
checkpoint directory holds `adapter_config.json` + `adapter_model.safetensors` (adapters and fully
trained parts), the base model's config.json, tokenizer and image processor; `adapter_config.json`'s
`base_model_name_or_path` names the base checkpoint the adapters apply to.

- `base_llava(model)`: the Llava model inside a PeftModel (its LoRA layers in place).
- `plain_module(module)`: the trained copy of a `ModulesToSaveWrapper` (what the model runs), else `module`.
- `merged_state_dict(module)`: `module`'s weights as a plain model would hold them, under the plain
  module's names: LoRA deltas added to their base weights, the trained copy of each wrapper. Nothing is
  modified (peft's merge/unmerge round trip would perturb the weights in the last bits), so it serves
  the exports written at every checkpoint of a running job.
- `load_lora_checkpoint(path)` (also reached through llava.model.builder `load_model`): the base loaded
  as any checkpoint, the adapters applied and merged: a plain Llava model.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils.other import ModulesToSaveWrapper
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from llava.model.parts import freeze_unused_vision_parts

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def is_lora_checkpoint(path: str | Path) -> bool:
    """Whether `path` is a directory holding LoRA adapters (adapter_config.json)."""
    return (Path(path) / ADAPTER_CONFIG).is_file()


def base_llava(model: torch.nn.Module) -> PreTrainedModel:
    """The Llava model inside a `PeftModel`; any other model as it is."""
    return model.get_base_model() if isinstance(model, PeftModel) else model


def plain_module(module: torch.nn.Module) -> torch.nn.Module:
    """The module a `ModulesToSaveWrapper` runs (its active trained copy, or the original when disabled)."""
    if not isinstance(module, ModulesToSaveWrapper):
        return module
    if module.disable_adapters or not module.active_adapters:
        return module.original_module
    return module.modules_to_save[module.active_adapters[0]]


def has_adapters(module: torch.nn.Module) -> bool:
    """Whether `module` contains LoRA layers or `modules_to_save` wrappers."""
    return any(isinstance(m, (LoraLayer, ModulesToSaveWrapper)) for m in module.modules())


def merged_state_dict(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`module`'s state dict as the plain (merged) model would have it; `module` is left as it is."""
    if not has_adapters(module):
        return module.state_dict()
    state: dict[str, torch.Tensor] = {}
    _collect(module, "", state)
    return state


def _collect(module: torch.nn.Module, prefix: str, state: dict[str, torch.Tensor]) -> None:
    module = plain_module(module)
    if isinstance(module, LoraLayer):
        base = module.get_base_layer()
        own = {k: v.detach() for k, v in base.state_dict().items()}
        if not module.disable_adapters and not module.merged:
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    own["weight"] = own["weight"] + module.get_delta_weight(adapter).to(own["weight"].dtype)
        state.update({prefix + k: v for k, v in own.items()})
        return
    for name, param in module._parameters.items():
        if param is not None:
            state[prefix + name] = param.detach()
    for name, buffer in module._buffers.items():
        if buffer is not None and name not in module._non_persistent_buffers_set:
            state[prefix + name] = buffer.detach()
    for name, child in module._modules.items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", state)


def adapter_base(path: str | Path) -> str:
    """The base checkpoint named by a LoRA checkpoint's adapter_config.json (checked to exist locally)."""
    config_file = Path(path) / ADAPTER_CONFIG
    base = json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"{config_file}: base_model_name_or_path {base!r} is not a model directory; the adapters apply to "
            "that base checkpoint (a LoRA run built from --llm/--vision_tower saves it as OUTPUT_DIR/lora_base)."
        )
    return base


def load_lora_checkpoint(
    path: str | Path, dtype: str = "float32", attn_implementation: str | dict | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, object]:
    """A LoRA checkpoint as a plain Llava model: its base loaded, the adapters applied and merged."""
    from llava.model.builder import load_model  # the builder dispatches LoRA directories here

    path = Path(path)
    model, tokenizer, image_processor = load_model(adapter_base(path), dtype, attn_implementation)
    merged = PeftModel.from_pretrained(model, str(path)).merge_and_unload()
    freeze_unused_vision_parts(merged)  # the merged-in trained copies come back with requires_grad set
    config_file = path / "config.json"
    loss_type = json.loads(config_file.read_text()).get("pivot_loss_type") if config_file.exists() else None
    if loss_type is not None:
        merged.config.pivot_loss_type = loss_type
    merged.config.use_cache = False
    logger.info("merged the LoRA adapters of %s into its base %s", path, adapter_base(path))
    return merged, tokenizer, image_processor
