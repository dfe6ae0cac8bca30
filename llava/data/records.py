"""Record schemas and their validation (DESIGN §3, docs/CONTRACTS.md §3).

Three record kinds, parsed from raw JSON dicts:

- conversation (LLaVA SFT format): `{"id", "image"?: str | list[str],
  "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", "value": "..."}, ...]}`
- preference (LLaVA-NeXT DPO format): `{"id", "image"?: str | list[str], "prompt", "chosen", "rejected",
  "meta"?: dict}`
- prompt (GRPO, issue 16): `{"id", "image"?, "prompt", "answer", "answer_format"?, "box"?, "meta"?}`: the
  ground truth the verifiable rewards (llava.train.rewards) check; `answer_format` is one of
  `multiple_choice`, `number`, `short` (default), `box` an `[x0, y0, x1, y1]` for grounding questions.

Rules, each failure raising a `llava.data.errors.RecordError` subclass that names file and id:

- `image` may be a string or a list of strings; absent, null or `[]` means a text-only record. Relative
  paths are joined to `image_folder` (when given); absolute paths are kept.
- A record without `id` gets the deterministic id `"<file stem>:<index>"` (index = 0-based position of
  the record in its file, before any mixture sampling). Non-string ids (e.g. ints) are turned into str.
- Conversation turns must alternate `human`/`gpt`, start with `human` and end with `gpt`.
- Replies (`gpt` values, `chosen`, `rejected`) must be non-empty; `<image>` may only appear in human
  turns / the prompt.
- If the record has images and its human turns (or prompt) hold no `<image>` at all, `"<image>\\n"` is
  prepended to the first human turn once per image (LLaVA-NeXT behaviour). Otherwise the number of
  `<image>` placeholders must equal the number of images.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llava.data.errors import (
    EmptyResponseError,
    ImageTokenMismatchError,
    InvalidRoleError,
    MalformedRecordError,
    MissingKeyError,
)
from llava.data.templates import IMAGE_PLACEHOLDER

HUMAN_ROLE = "human"
ASSISTANT_ROLE = "gpt"


@dataclass(frozen=True)
class ConversationRecord:
    """One SFT / pretraining sample: images and (human, gpt) exchanges, in order."""

    id: str
    images: list[str]
    turns: list[tuple[str, str]]
    source: str

    @property
    def human_texts(self) -> list[str]:
        return [human for human, _ in self.turns]


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair: a prompt with a chosen and a rejected reply."""

    id: str
    images: list[str]
    prompt: str
    chosen: str
    rejected: str
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def human_texts(self) -> list[str]:
        return [self.prompt]


@dataclass(frozen=True)
class PromptRecord:
    """One GRPO prompt with the ground truth its sampled completions are rewarded against."""

    id: str
    images: list[str]
    prompt: str
    answer: str
    answer_format: str = "short"
    box: list[float] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @property
    def human_texts(self) -> list[str]:
        return [self.prompt]

    def reward_fields(self) -> dict[str, Any]:
        """What a reward function sees of this record (llava.train.rewards): meta, then the ground truth."""
        return {
            **self.meta,
            "id": self.id,
            "answer": self.answer,
            "answer_format": self.answer_format,
            "box": self.box,
        }


Record = ConversationRecord | PreferenceRecord | PromptRecord
ANSWER_FORMATS = ("multiple_choice", "number", "short")


def default_record_id(source: str, index: int) -> str:
    """The id given to a record without one: `"<file stem>:<index>"`."""
    return f"{Path(source).stem}:{index}"


def _record_id(raw: Mapping[str, Any], source: str, index: int) -> str:
    value = raw.get("id")
    return default_record_id(source, index) if value is None else str(value)


def _require_string(raw: Mapping[str, Any], key: str, source: str, record_id: str, where: str = "") -> str:
    if key not in raw:
        raise MissingKeyError(source, record_id, f"missing key {key!r}{where}")
    value = raw[key]
    if not isinstance(value, str):
        raise MalformedRecordError(
            source, record_id, f"{key!r}{where} must be a string, got {type(value).__name__}"
        )
    return value


def _parse_images(raw: Mapping[str, Any], source: str, record_id: str, image_folder: str | None) -> list[str]:
    value = raw.get("image")
    if value is None:
        return []
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
        raise MalformedRecordError(source, record_id, "'image' must be a non-empty string or a list of them")
    return [resolve_image_path(name, image_folder) for name in names]


def resolve_image_path(name: str, image_folder: str | None) -> str:
    """Join a relative image path to `image_folder`; absolute paths (or no folder) are kept."""
    if image_folder is None or os.path.isabs(name):
        return name
    return os.path.join(image_folder, name)


def check_reply(text: str, what: str, source: str, record_id: str) -> None:
    """Raise if an assistant reply is empty or holds an `<image>` placeholder."""
    if not text.strip():
        raise EmptyResponseError(source, record_id, f"{what} is empty")
    if IMAGE_PLACEHOLDER in text:
        raise ImageTokenMismatchError(source, record_id, f"{what} contains {IMAGE_PLACEHOLDER!r}")


def _with_image_placeholders(
    first_human: str, all_human: list[str], n_images: int, source: str, record_id: str
) -> str:
    """Return the first human text, with placeholders prepended when none are present anywhere."""
    found = sum(text.count(IMAGE_PLACEHOLDER) for text in all_human)
    if found == 0 and n_images > 0:
        return f"{IMAGE_PLACEHOLDER}\n" * n_images + first_human
    if found != n_images:
        raise ImageTokenMismatchError(
            source,
            record_id,
            f"text has {found} {IMAGE_PLACEHOLDER!r} placeholder(s) but the record has {n_images} image(s)",
        )
    return first_human


def _require_mapping(raw: Any, source: str, index: int) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise MalformedRecordError(
            source, default_record_id(source, index), f"record is a {type(raw).__name__}, not an object"
        )
    return raw


def parse_conversation_record(
    raw: Any, source: str, index: int, image_folder: str | None = None
) -> ConversationRecord:
    """Validate a raw LLaVA conversation dict (see module docstring) and return the record."""
    raw = _require_mapping(raw, source, index)
    record_id = _record_id(raw, source, index)
    images = _parse_images(raw, source, record_id, image_folder)
    if "conversations" not in raw:
        raise MissingKeyError(source, record_id, "missing key 'conversations'")
    conversation = raw["conversations"]
    if not isinstance(conversation, list) or not conversation:
        raise MalformedRecordError(source, record_id, "'conversations' must be a non-empty list")
    roles: list[str] = []
    values: list[str] = []
    for position, turn in enumerate(conversation):
        where = f" in conversations[{position}]"
        if not isinstance(turn, Mapping):
            raise MalformedRecordError(source, record_id, f"conversations[{position}] is not an object")
        roles.append(_require_string(turn, "from", source, record_id, where))
        values.append(_require_string(turn, "value", source, record_id, where))
    expected = [HUMAN_ROLE if i % 2 == 0 else ASSISTANT_ROLE for i in range(len(roles))]
    if roles != expected or len(roles) % 2:
        raise InvalidRoleError(
            source,
            record_id,
            f"roles {roles} must alternate {HUMAN_ROLE!r}/{ASSISTANT_ROLE!r}, start with {HUMAN_ROLE!r} "
            f"and end with {ASSISTANT_ROLE!r}",
        )
    humans, replies = values[0::2], values[1::2]
    for position, reply in enumerate(replies):
        check_reply(reply, f"reply {position} (conversations[{2 * position + 1}])", source, record_id)
    humans[0] = _with_image_placeholders(humans[0], humans, len(images), source, record_id)
    return ConversationRecord(id=record_id, images=images, turns=list(zip(humans, replies)), source=source)


def parse_preference_record(
    raw: Any, source: str, index: int, image_folder: str | None = None
) -> PreferenceRecord:
    """Validate a raw LLaVA-NeXT DPO dict (see module docstring) and return the record."""
    raw = _require_mapping(raw, source, index)
    record_id = _record_id(raw, source, index)
    images = _parse_images(raw, source, record_id, image_folder)
    prompt = _require_string(raw, "prompt", source, record_id)
    chosen = _require_string(raw, "chosen", source, record_id)
    rejected = _require_string(raw, "rejected", source, record_id)
    check_reply(chosen, "'chosen'", source, record_id)
    check_reply(rejected, "'rejected'", source, record_id)
    meta = raw.get("meta", {})
    if not isinstance(meta, Mapping):
        raise MalformedRecordError(source, record_id, "'meta' must be an object")
    prompt = _with_image_placeholders(prompt, [prompt], len(images), source, record_id)
    return PreferenceRecord(
        id=record_id,
        images=images,
        prompt=prompt,
        chosen=chosen,
        rejected=rejected,
        meta=dict(meta),
        source=source,
    )


def parse_prompt_record(raw: Any, source: str, index: int, image_folder: str | None = None) -> PromptRecord:
    """Validate a raw GRPO prompt dict (see module docstring) and return the record."""
    raw = _require_mapping(raw, source, index)
    record_id = _record_id(raw, source, index)
    images = _parse_images(raw, source, record_id, image_folder)
    prompt = _require_string(raw, "prompt", source, record_id)
    if "answer" not in raw or raw["answer"] is None:
        raise MissingKeyError(
            source,
            record_id,
            "missing key 'answer' (the ground truth a GRPO reward checks completions against)",
        )
    answer = raw["answer"]
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or not str(answer).strip():
        raise MalformedRecordError(
            source, record_id, f"'answer' must be a non-empty string or a number, got {answer!r}"
        )
    answer_format = raw.get("answer_format", "short")
    if answer_format not in ANSWER_FORMATS:
        raise MalformedRecordError(
            source, record_id, f"'answer_format' {answer_format!r}: choose one of {ANSWER_FORMATS}"
        )
    box = raw.get("box")
    if box is not None and (
        not isinstance(box, list) or len(box) != 4 or not all(isinstance(v, int | float) for v in box)
    ):
        raise MalformedRecordError(source, record_id, f"'box' must be [x0, y0, x1, y1], got {box!r}")
    meta = raw.get("meta", {})
    if not isinstance(meta, Mapping):
        raise MalformedRecordError(source, record_id, "'meta' must be an object")
    prompt = _with_image_placeholders(prompt, [prompt], len(images), source, record_id)
    return PromptRecord(
        id=record_id,
        images=images,
        prompt=prompt,
        answer=str(answer),
        answer_format=answer_format,
        box=None if box is None else [float(v) for v in box],
        meta=dict(meta),
        source=source,
    )


RECORD_PARSERS = {
    "conversation": parse_conversation_record,
    "preference": parse_preference_record,
    "prompt": parse_prompt_record,
}


def parse_record(raw: Any, source: str, index: int, kind: str, image_folder: str | None = None) -> Record:
    """Parse one raw dict as `kind` ("conversation", "preference" or "prompt")."""
    if kind not in RECORD_PARSERS:
        raise ValueError(f"unknown record kind {kind!r}; choose one of {sorted(RECORD_PARSERS)}")
    return RECORD_PARSERS[kind](raw, source, index, image_folder)
