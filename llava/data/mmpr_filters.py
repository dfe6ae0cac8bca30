"""Sample filters and token counting for the MMPR converter (`llava.data.mmpr`).

Follows the data variants of Song et al. 2025 ("RL makes MLLMs see better than SFT", arXiv
2510.16333, appendix E) and PIVOT's MMPR sampler:

- ``under30``: the chosen response has fewer than 30 words.
- ``nothink``: the chosen response has no reasoning tags (see :data:`REASONING_TAGS`) and fewer
  than 60 words.
- "long or tagged" (the new-distribution study, ``--shift_ratio r``): the chosen response has more
  than 100 words or contains a reasoning tag.
- token limit: ``prompt + " " + chosen`` (the prompt already carrying its ``<image>`` placeholders,
  which count as text, as in PIVOT's sampler) encoded without special tokens must have at most
  ``token_limit`` tokens. This is PIVOT's rule and not training's length: the converter also checks
  each candidate exactly as training tokenises it (``llava.data.mmpr_fit``).

Words are whitespace-separated chunks (``len(text.split())``). All filters look at the chosen
response only: prompts may legitimately mention tags in their instructions.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Protocol

REASONING_TAGS: tuple[str, ...] = ("think", "review", "reasoning", "reflection", "answer", "summary")
"""XML-style tag names that mark a "tagged" (reasoning-style) response. An opening or closing tag
of any of these names, in any letter case and with optional attributes (``<think>``,
``</Review>``, ``<answer type="x">``), makes a response tagged. ``<image>`` is not one of them."""

UNDER30_MAX_WORDS = 30
NOTHINK_MAX_WORDS = 60
LONG_MIN_WORDS = 100

_TAG_RE = re.compile(r"</?\s*(?:" + "|".join(REASONING_TAGS) + r")\b[^<>]*>", re.IGNORECASE)


def word_count(text: str) -> int:
    """Number of whitespace-separated words in ``text``."""
    return len(text.split())


def has_reasoning_tags(text: str) -> bool:
    """True when ``text`` contains an opening or closing tag named in :data:`REASONING_TAGS`."""
    return _TAG_RE.search(text) is not None


def keep_under30(chosen: str) -> bool:
    """Paper's Under30 variant: chosen response shorter than 30 words."""
    return word_count(chosen) < UNDER30_MAX_WORDS


def keep_nothink(chosen: str) -> bool:
    """Paper's NoThink variant: no reasoning tags and chosen response shorter than 60 words."""
    return not has_reasoning_tags(chosen) and word_count(chosen) < NOTHINK_MAX_WORDS


def is_long_or_tagged(chosen: str) -> bool:
    """New-distribution study: chosen response longer than 100 words or containing reasoning tags."""
    return word_count(chosen) > LONG_MIN_WORDS or has_reasoning_tags(chosen)


FILTERS: dict[str, Callable[[str], bool]] = {
    "under30": keep_under30,
    "nothink": keep_nothink,
}
"""Named sample filters, applied to the chosen response in this (registry) order; True keeps."""


def token_limit_text(prompt: str, chosen: str) -> str:
    """The text whose token count the token limit bounds (PIVOT: ``f"{prompt} {chosen}".strip()``)."""
    return f"{prompt} {chosen}".strip()


class TokenCounter(Protocol):
    """Counts tokens of a batch of texts (no special tokens)."""

    name: str
    description: str

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text."""
        ...


class ApproxTokenCounter:
    """Tokenizer-free estimate: ``max(whitespace words, ceil(characters / 4))``.

    Four characters per token is the usual English average of BPE tokenizers such as Qwen2.5's;
    the word count guards texts made of many short words. Used only when no tokenizer is given.
    """

    name = "approximation"
    description = "max(len(text.split()), ceil(len(text) / 4)); no tokenizer given"

    def count(self, texts: Sequence[str]) -> list[int]:
        """Estimated token count of each text."""
        return [max(word_count(t), math.ceil(len(t) / 4)) for t in texts]


class HFTokenCounter:
    """Exact counts with a Hugging Face tokenizer (``AutoTokenizer``; local path or hub id)."""

    description = "AutoTokenizer(...)(text, add_special_tokens=False)"

    def __init__(self, name_or_path: str) -> None:
        from transformers import AutoTokenizer

        self.name = name_or_path
        try:
            self._tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        except (OSError, ValueError) as err:
            raise ValueError(
                f"--tokenizer {name_or_path!r} could not be loaded with AutoTokenizer ({err}); pass a "
                "local tokenizer directory, or omit --tokenizer to use the documented approximation"
            ) from err

    def count(self, texts: Sequence[str]) -> list[int]:
        """Token count of each text, without special tokens."""
        if not texts:
            return []
        encoded = self._tokenizer(list(texts), add_special_tokens=False, verbose=False)
        return [len(ids) for ids in encoded["input_ids"]]


def load_token_counter(tokenizer: str | None) -> TokenCounter:
    """A tokenizer-backed counter for ``tokenizer`` or, when None, :class:`ApproxTokenCounter`."""
    return ApproxTokenCounter() if tokenizer is None else HFTokenCounter(tokenizer)
