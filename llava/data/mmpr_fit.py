"""Training-time length check of MMPR candidates, for the converter (`llava.data.mmpr`).

PIVOT's 1500-token sampling rule counts ``prompt + chosen`` as plain text, with ``<image>`` as a few
text tokens. At training time each ``<image>`` becomes its visual tokens (576 for the paper's square
setting: one 384² image through a patch-16 SigLIP → 24×24), the ``qwen_1_5`` template adds its system
prompt and role headers, the rejected reply counts too, and nothing is truncated: a longer sequence
raises :class:`~llava.data.errors.SequenceTooLongError`. So the converter also runs, on every candidate
it would write, exactly what training runs: the DPO record is parsed with
:func:`llava.data.records.parse_record` and tokenised with :func:`tokenize_preference` (prompt+chosen
and prompt+rejected), the SFT record with :func:`tokenize_conversation`, each with the training chat
template, ``image_tokens`` ids per image and ``model_max_length``. A candidate that fails either is
excluded (and listed in the report) before it can be sampled, so the SFT and DPO jsons hold exactly
the same records and every one of them trains.

``image_tokens`` is one number per image. Square models (the paper) use the same count for every
image; for anyres models the count depends on the image size, so pass an upper bound.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from llava.data.errors import RecordError
from llava.data.records import parse_record
from llava.data.templates import get_template
from llava.data.tokenization import tokenize_conversation, tokenize_preference


def load_training_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The tokenizer as training uses it: ``AutoTokenizer`` plus the ``<image>`` special token.

    Training adds ``<image>`` with :func:`llava.model.builder.ensure_image_token` when the LLM's
    tokenizer lacks it (Qwen2.5 does); the same function is applied here.
    """
    from transformers import AutoTokenizer

    from llava.model.builder import ensure_image_token

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--tokenizer {name_or_path!r} could not be loaded with AutoTokenizer ({err}); pass the local "
            "tokenizer directory of the LLM you will train"
        ) from err
    ensure_image_token(tokenizer)
    return tokenizer


@dataclass(frozen=True)
class TrainingFitCheck:
    """Would a converted record pass training's tokenisation within ``model_max_length``?"""

    tokenizer: PreTrainedTokenizerBase
    template: str
    model_max_length: int
    image_tokens: int

    def __post_init__(self) -> None:
        get_template(self.template)
        if self.model_max_length < 1:
            raise ValueError(f"model_max_length must be >= 1, got {self.model_max_length}")
        if self.image_tokens < 1:
            raise ValueError(f"image_tokens must be >= 1 (visual tokens per image), got {self.image_tokens}")

    def problem(
        self, dpo_record: Mapping[str, Any], sft_record: Mapping[str, Any], source: str
    ) -> str | None:
        """None when both records tokenise as at training time, else the training error's reason."""
        try:
            preference = parse_record(dpo_record, source, 0, "preference")
            counts = [self.image_tokens] * len(preference.images)
            common = {"record_id": preference.id, "source": source}
            tokenize_preference(
                preference.prompt,
                preference.chosen,
                preference.rejected,
                self.tokenizer,
                self.template,
                counts,
                self.model_max_length,
                **common,
            )
            conversation = parse_record(sft_record, source, 0, "conversation")
            tokenize_conversation(
                conversation.turns, self.tokenizer, self.template, counts, self.model_max_length, **common
            )
        except RecordError as error:
            return error.reason
        return None
