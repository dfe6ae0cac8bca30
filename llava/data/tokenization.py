"""Tokenisation of conversations and preference pairs with exact label masks.

Follows LLaVA-NeXT's `preprocess_qwen` / `preprocess_plain` (DESIGN §2-§4) with two deliberate choices:

- Each template piece (system prompt, role headers, human text, reply, end-of-turn) is tokenised on its
  own and the ids are concatenated, so no BPE merge crosses a role boundary and the mask is exact.
- Only assistant replies and the end-of-turn text right after them (`<|im_end|>` for `qwen_1_5`, `"\\n"`
  for `plain`) are supervised; everything else is -100. Upstream LLaVA-NeXT / PIVOT `preprocess_qwen`
  supervises more: each assistant turn as the chat template renders it, i.e. also its
  `<|im_start|>assistant\\n` header and the `"\\n"` after its `<|im_end|>`, and then it un-masks every
  `<|im_start|>`, `<|im_end|>` and `"\\n"` token (Qwen id 198) anywhere, system and user turns included
  (`unmask_tokens_idx = [198, im_start, im_end]`). That is about 13 extra supervised tokens in a
  single-image, single-turn sample, all template scaffolding with near-zero loss once learnt. We do not
  supervise them: generation starts after the assistant header and stops at `<|im_end|>`, so the model
  never has to produce them. Because the loss is a mean over supervised tokens, at equal learning rate
  the SFT gradient per content token here is larger than upstream's, most for short answers. The DPO loss
  is essentially unaffected: the extra tokens of the shared prompt and assistant header score the
  same for chosen and rejected and cancel in the margin (only the `"\\n"` after `<|im_end|>` differs,
  with log-prob ≈ 0).

Each `<image>` placeholder becomes `image_token_counts[i]` copies of the `<image>` token id (the HF
Llava convention: `input_ids` hold one image-token id per visual token). Nothing is ever truncated:
a sequence longer than `model_max_length` after expansion raises `SequenceTooLongError`. Record text
is encoded like any text, so a literal special-token string (e.g. `<|im_end|>`) inside it becomes that
special token, as upstream.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from transformers import PreTrainedTokenizerBase

from llava.data.errors import (
    ImageTokenMismatchError,
    SequenceTooLongError,
    TemplateMismatchError,
)
from llava.data.records import check_reply
from llava.data.templates import IMAGE_PLACEHOLDER, ChatTemplate, Segment, get_template

IGNORE_INDEX = -100
UNKNOWN = "<unknown>"


def image_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id of the `<image>` token; fails if the tokenizer does not encode it as one token."""
    ids = tokenizer.encode(IMAGE_PLACEHOLDER, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(
            f"tokenizer encodes {IMAGE_PLACEHOLDER!r} as {len(ids)} tokens; add it first, e.g. "
            f"tokenizer.add_special_tokens({{'extra_special_tokens': ['{IMAGE_PLACEHOLDER}']}})"
        )
    return ids[0]


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False) if text else []


def _encode_segment(
    segment: Segment, tokenizer: PreTrainedTokenizerBase, image_id: int, counts: Iterator[int]
) -> list[int]:
    """Encode one piece; placeholders (only in unsupervised human text) become visual-token runs."""
    parts = segment.text.split(IMAGE_PLACEHOLDER)
    ids = _encode(tokenizer, parts[0])
    for part in parts[1:]:
        ids += [image_id] * next(counts)
        ids += _encode(tokenizer, part)
    return ids


def _check_images(
    humans: Sequence[str], image_token_counts: Sequence[int], source: str, record_id: str
) -> None:
    found = sum(text.count(IMAGE_PLACEHOLDER) for text in humans)
    if found != len(image_token_counts):
        raise ImageTokenMismatchError(
            source,
            record_id,
            f"text has {found} {IMAGE_PLACEHOLDER!r} placeholder(s) but {len(image_token_counts)} image(s) were given",
        )
    if any(count < 1 for count in image_token_counts):
        raise ValueError(
            f"{source}: record {record_id!r}: image_token_counts must be >= 1, got {list(image_token_counts)}"
        )


def _check_length(
    n_tokens: int, n_image_tokens: int, limit: int, what: str, source: str, record_id: str
) -> None:
    if n_tokens > limit:
        raise SequenceTooLongError(
            source,
            record_id,
            f"{what} has {n_tokens} tokens ({n_image_tokens} of them image tokens) > model_max_length {limit}",
        )


def _resolve(template: ChatTemplate | str) -> ChatTemplate:
    return get_template(template) if isinstance(template, str) else template


def _encode_segments(
    segments: Sequence[Segment], tokenizer: PreTrainedTokenizerBase, image_id: int, counts: Iterator[int]
) -> tuple[list[int], list[int]]:
    input_ids: list[int] = []
    labels: list[int] = []
    for segment in segments:
        ids = _encode_segment(segment, tokenizer, image_id, counts)
        input_ids += ids
        labels += ids if segment.supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def tokenize_prompt(
    human: str,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | str,
    image_token_counts: Sequence[int],
    *,
    record_id: str = UNKNOWN,
    source: str = UNKNOWN,
) -> list[int]:
    """Token ids of a generation prompt (one human turn, then the assistant header), as in training."""
    template = _resolve(template)
    _check_images([human], image_token_counts, source, record_id)
    segments = template.prompt_segments(human, first=True)
    ids, _ = _encode_segments(segments, tokenizer, image_token_id(tokenizer), iter(image_token_counts))
    return ids


def tokenize_prompt_within(
    human: str,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | str,
    image_token_counts: Sequence[int],
    model_max_length: int,
    *,
    record_id: str = UNKNOWN,
    source: str = UNKNOWN,
) -> list[int]:
    """`tokenize_prompt`, refusing a prompt that leaves no room in `model_max_length` for a completion."""
    ids = tokenize_prompt(human, tokenizer, template, image_token_counts, record_id=record_id, source=source)
    _check_length(len(ids) + 1, sum(image_token_counts), model_max_length, "prompt", source, record_id)
    return ids


def tokenize_conversation(
    turns: Sequence[tuple[str, str]],
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | str,
    image_token_counts: Sequence[int],
    model_max_length: int,
    *,
    record_id: str = UNKNOWN,
    source: str = UNKNOWN,
) -> tuple[list[int], list[int]]:
    """Tokenise (human, gpt) exchanges; labels are -100 except replies and their end-of-turn text."""
    template = _resolve(template)
    if not turns:
        raise TemplateMismatchError(source, record_id, "conversation has no exchanges")
    if template.max_turns is not None and len(turns) > template.max_turns:
        raise TemplateMismatchError(
            source,
            record_id,
            f"template {template.name!r} takes at most {template.max_turns} exchange(s), got {len(turns)}",
        )
    for position, (_, reply) in enumerate(turns):
        check_reply(reply, f"reply {position}", source, record_id)
    _check_images([human for human, _ in turns], image_token_counts, source, record_id)
    input_ids, labels = _encode_segments(
        template.segments(list(turns)), tokenizer, image_token_id(tokenizer), iter(image_token_counts)
    )
    _check_length(
        len(input_ids), sum(image_token_counts), model_max_length, "conversation", source, record_id
    )
    return input_ids, labels


def tokenize_preference(
    prompt: str,
    chosen: str,
    rejected: str,
    tokenizer: PreTrainedTokenizerBase,
    template: ChatTemplate | str,
    image_token_counts: Sequence[int],
    model_max_length: int,
    *,
    record_id: str = UNKNOWN,
    source: str = UNKNOWN,
) -> dict[str, list[int]]:
    """Tokenise prompt+chosen and prompt+rejected; the prompt ids are shared (identical) by both."""
    template = _resolve(template)
    check_reply(chosen, "'chosen'", source, record_id)
    check_reply(rejected, "'rejected'", source, record_id)
    _check_images([prompt], image_token_counts, source, record_id)
    image_id = image_token_id(tokenizer)
    prompt_ids, prompt_labels = _encode_segments(
        template.prompt_segments(prompt, first=True), tokenizer, image_id, iter(image_token_counts)
    )
    out: dict[str, list[int]] = {}
    for name, reply, prefix in (("chosen", chosen, ""), ("rejected", rejected, "rejected_")):
        reply_ids, reply_labels = _encode_segments(
            template.reply_segments(reply), tokenizer, image_id, iter(())
        )
        out[f"{prefix}input_ids"] = prompt_ids + reply_ids
        out[f"{prefix}labels"] = prompt_labels + reply_labels
        _check_length(
            len(out[f"{prefix}input_ids"]),
            sum(image_token_counts),
            model_max_length,
            f"prompt+{name}",
            source,
            record_id,
        )
    return out
