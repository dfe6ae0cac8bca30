"""Sequence log-probabilities of responses, with each image encoded once per sample.

`encode_images` runs vision tower + projector (HF `get_image_features`) once. `response_logps` writes
those features into the `<image>` positions of the token embeddings (as HF Llava's `forward` does
with `masked_scatter`) and runs the language model; for a DPO pair the chosen and rejected sequences
go through one forward as a 2B batch that reuses the same image features, so the image is encoded
once and its gradient is the sum of both sides' gradients (the reference code encoded it twice, and
twice more in the reference model).

The language-model pass goes through the (possibly DDP/DeepSpeed-wrapped) model's own `forward`,
once per call, with `inputs_embeds`; the wrappers need that one forward per backward. Logits are
computed only at positions that predict a supervised token (`logits_to_keep` with those column
indices), so the prompt and its hundreds of image tokens never pay for the vocabulary projection.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

from llava.model.adapters import base_llava

IGNORE_INDEX = -100


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The HF model inside a DDP / DeepSpeed wrapper (both keep it as `.module`) and a peft wrapper."""
    return base_llava(model.module if hasattr(model, "module") else model)


def encode_images(
    model: PreTrainedModel, pixel_values: torch.Tensor | None, image_sizes: torch.Tensor | None
) -> torch.Tensor | None:
    """Projected visual tokens of every image in the batch, concatenated: [total_image_tokens, D]."""
    if pixel_values is None:
        return None
    model = unwrap(model)
    kwargs = {"image_sizes": image_sizes} if model.config.model_type == "llava_onevision" else {}
    pixel_values = pixel_values.to(model.dtype)
    features = model.model.get_image_features(pixel_values=pixel_values, **kwargs).pooler_output
    return torch.cat(list(features), dim=0)


def embed_with_images(
    model: PreTrainedModel, input_ids: torch.Tensor, image_features: torch.Tensor | None
) -> torch.Tensor:
    """Token embeddings with the image features scattered into the `<image>` positions."""
    embeds = model.get_input_embeddings()(input_ids)
    image_mask = input_ids == model.config.image_token_id
    n_slots = int(image_mask.sum())
    n_features = 0 if image_features is None else image_features.shape[0]
    if n_slots != n_features:
        raise ValueError(
            f"{n_slots} <image> token positions but {n_features} visual tokens: the tokenizer's image-token "
            "expansion disagrees with the model (check image_aspect_ratio and the image processor)."
        )
    if n_slots == 0:
        return embeds
    return embeds.masked_scatter(image_mask.unsqueeze(-1), image_features.to(embeds.dtype))


def response_logps(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    labels: torch.Tensor,
    image_features: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the supervised tokens of each row, and their count: ([B], [B])."""
    embeds = embed_with_images(unwrap(model), input_ids, image_features)
    targets = labels[:, 1:]
    valid = targets != IGNORE_INDEX
    columns = valid.any(dim=0).nonzero()[:, 0]  # hidden state t predicts token t + 1
    logits = model(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=columns).logits
    kept_targets, kept_valid = targets[:, columns], valid[:, columns]
    token_logps = torch.log_softmax(logits[kept_valid].float(), dim=-1)
    token_logps = token_logps.gather(-1, kept_targets[kept_valid].unsqueeze(-1)).squeeze(-1)
    rows = kept_valid.nonzero()[:, 0]
    sums = torch.zeros(input_ids.shape[0], dtype=token_logps.dtype, device=token_logps.device)
    return sums.index_add(0, rows, token_logps), valid.sum(dim=1)


def pair_logps(
    model: PreTrainedModel, batch: dict, share_image_encoding: bool = True
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen token counts, rejected token counts) for a preference batch.

    With `share_image_encoding=False` each side encodes its images itself (the naive baseline that
    the shared path must match; used by tests and benchmarks).
    """
    pixel_values, image_sizes = batch.get("pixel_values"), batch.get("image_sizes")
    input_ids = torch.cat([batch["input_ids"], batch["rejected_input_ids"]])
    attention_mask = torch.cat([batch["attention_mask"], batch["rejected_attention_mask"]])
    labels = torch.cat([batch["labels"], batch["rejected_labels"]])
    if share_image_encoding:
        features = encode_images(model, pixel_values, image_sizes)
        both = None if features is None else torch.cat([features, features])
    else:
        chosen_features = encode_images(model, pixel_values, image_sizes)
        rejected_features = encode_images(model, pixel_values, image_sizes)
        both = None if chosen_features is None else torch.cat([chosen_features, rejected_features])
    logps, counts = response_logps(model, input_ids, attention_mask, labels, both)
    size = batch["input_ids"].shape[0]
    return logps[:size], logps[size:], counts[:size], counts[size:]


def chosen_logps(model: PreTrainedModel, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logps, token counts) of the conversation / chosen side only (SFT)."""
    features = encode_images(model, batch.get("pixel_values"), batch.get("image_sizes"))
    return response_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"], features)
