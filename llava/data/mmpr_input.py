"""Reading and validating MMPR-v1.2 input for the converter (`llava.data.mmpr`), and the records it writes.

``meta.json`` maps dataset names to ``{"root", "annotation"}`` (paths relative to the meta file's
directory); each annotation jsonl line is ``{"image"?, "question", "chosen", "rejected", ...extra}``
(DESIGN §3). :func:`parse_line` turns a line into an :class:`MMPRItem` or an :class:`Issue` saying why
it cannot be a sample (malformed, or image files missing). :func:`to_dpo_record` and
:func:`to_sft_record` give the LLaVA-NeXT preference record and the LLaVA conversation record of an
item (docs/CONTRACTS.md §3), with ids ``"<dataset>/<1-based line>"``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from llava.data.errors import RecordError

IMAGE_TOKEN = "<image>"
RESPONSE_KEYS = ("question", "chosen", "rejected")
META_KEYS = ("source_dataset", "source_line")
SKIPPED_FILENAME = "mmpr_skipped.jsonl"
MAX_LISTED_ISSUES = 20


@dataclass(frozen=True)
class DatasetSource:
    """One ``meta.json`` entry with its paths resolved."""

    name: str
    root: Path
    annotation: Path


@dataclass(frozen=True)
class Issue:
    """A line that cannot become a sample (``kind``: malformed, missing_image) or a candidate the
    converter excluded (too_many_images, over_token_limit, too_long_for_training), with the reason."""

    kind: str
    dataset: str
    path: str
    line: int
    reason: str

    @property
    def record_id(self) -> str:
        return f"{self.dataset}/{self.line}"

    def to_json(self) -> dict[str, Any]:
        return {"id": self.record_id, **asdict(self)}


class MMPRInputError(RecordError):
    """Bad MMPR input lines; ``.issues`` lists all, ``.path/.record_id/.reason`` name the first."""

    def __init__(self, issues: Sequence[Issue]) -> None:
        self.issues = list(issues)
        first = self.issues[0]
        super().__init__(first.path, first.record_id, first.reason)
        listed = "\n".join(
            f"  {i.path}:{i.line} [{i.record_id}] {i.kind}: {i.reason}"
            for i in self.issues[:MAX_LISTED_ISSUES]
        )
        more = len(self.issues) - MAX_LISTED_ISSUES
        tail = f"\n  ... and {more} more" if more > 0 else ""
        self.args = (
            f"{len(self.issues)} MMPR annotation line(s) cannot be converted:\n{listed}{tail}\n"
            f"Fix the input, or pass --skip_missing to skip them (listed in {SKIPPED_FILENAME}).",
        )

    def __reduce__(self) -> tuple[type, tuple[list[Issue]]]:
        return (type(self), (self.issues,))


@dataclass(frozen=True)
class MMPRItem:
    """A validated annotation line, ready to become a DPO and an SFT record."""

    dataset: str
    line: int
    annotation: str
    images: tuple[str, ...]
    prompt: str
    chosen: str
    rejected: str
    extra: dict[str, Any]
    image_token_added: bool = False

    @property
    def id(self) -> str:
        return f"{self.dataset}/{self.line}"

    @property
    def kind(self) -> str:
        return {0: "text_only", 1: "single_image"}.get(len(self.images), "multi_image")


def read_meta(meta_path: str | Path) -> list[DatasetSource]:
    """Parse ``meta.json`` into dataset sources sorted by name (paths relative to its directory)."""
    meta_path = Path(meta_path)

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [k for k, _ in pairs]
        dupes = sorted({k for k in keys if keys.count(k) > 1})
        if dupes:
            raise ValueError(f"{meta_path}: duplicate key(s) {dupes}")
        return dict(pairs)

    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"), object_pairs_hook=no_duplicates)
    except json.JSONDecodeError as err:
        raise ValueError(f"{meta_path}: not valid JSON ({err})") from err
    if not isinstance(meta, dict) or not meta:
        raise ValueError(f"{meta_path}: expected a non-empty object mapping dataset names to entries")
    sources = []
    for name in sorted(meta):
        entry = meta[name]
        if not isinstance(entry, dict) or not all(
            isinstance(entry.get(k), str) for k in ("root", "annotation")
        ):
            raise ValueError(f"{meta_path}: dataset {name!r} needs string fields 'root' and 'annotation'")
        annotation = meta_path.parent / entry["annotation"]
        if not annotation.is_file():
            raise ValueError(f"{meta_path}: annotation file of dataset {name!r} not found: {annotation}")
        sources.append(DatasetSource(name, meta_path.parent / entry["root"], annotation))
    return sources


def _parse_images(value: Any) -> tuple[str, ...] | str:
    """The image list of a line, or a reason string when the ``image`` field is malformed."""
    if value is None:
        return ()
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        return f"'image' must be a non-empty path or a non-empty list of paths, got {value!r}"
    return tuple(value)


def parse_line(raw: str, source: DatasetSource, line: int, image_folder: str | None) -> MMPRItem | Issue:
    """Validate one annotation line; an :class:`Issue` explains why it cannot become a sample."""

    def issue(kind: str, reason: str) -> Issue:
        return Issue(kind, source.name, str(source.annotation), line, reason)

    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as err:
        return issue("malformed", f"invalid JSON ({err})")
    if not isinstance(obj, dict):
        return issue("malformed", f"expected a JSON object, got {type(obj).__name__}")
    for key in RESPONSE_KEYS:
        if not isinstance(obj.get(key), str):
            return issue("malformed", f"missing or non-string {key!r}")
    question, chosen, rejected = (obj[k] for k in RESPONSE_KEYS)
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            return issue("malformed", f"empty {key!r}")
        if IMAGE_TOKEN in text:
            return issue("malformed", f"{key!r} contains the {IMAGE_TOKEN} placeholder")
    clashes = [k for k in META_KEYS if k in obj]
    if clashes:
        return issue("malformed", f"extra key(s) {clashes} clash with the converter's meta keys")
    images = _parse_images(obj.get("image"))
    if isinstance(images, str):
        return issue("malformed", images)
    placeholders = question.count(IMAGE_TOKEN)
    if placeholders not in (0, len(images)):
        return issue(
            "malformed",
            f"question has {placeholders} {IMAGE_TOKEN} placeholder(s) for {len(images)} image(s)",
        )
    paths = [os.path.abspath(source.root / image) for image in images]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        return issue("missing_image", f"{len(missing)} image file(s) not found: {missing[:3]}")
    if image_folder is not None:
        folder = os.path.abspath(image_folder)
        paths = [os.path.relpath(p, folder) for p in paths]
        outside = [p for p in paths if p.split(os.sep)[0] == os.pardir]
        if outside:
            raise ValueError(
                f"{source.annotation}:{line}: image {outside[0]!r} lies outside --image_folder {folder}; "
                "pass the common parent of all MMPR image roots, or omit --image_folder for absolute paths"
            )
    add_tokens = bool(images) and not placeholders
    prompt = f"{IMAGE_TOKEN}\n" * len(images) + question if add_tokens else question
    extra = {k: v for k, v in obj.items() if k not in (*RESPONSE_KEYS, "image")}
    return MMPRItem(
        source.name, line, str(source.annotation), tuple(paths), prompt, chosen, rejected, extra, add_tokens
    )


def item_issue(item: MMPRItem, kind: str, reason: str) -> Issue:
    """An :class:`Issue` naming ``item``'s annotation file and line."""
    return Issue(kind, item.dataset, item.annotation, item.line, reason)


def image_field(item: MMPRItem) -> dict[str, Any]:
    if not item.images:
        return {}
    return {"image": item.images[0] if len(item.images) == 1 else list(item.images)}


def record_meta(item: MMPRItem) -> dict[str, Any]:
    return {"source_dataset": item.dataset, "source_line": item.line, **item.extra}


def to_dpo_record(item: MMPRItem) -> dict[str, Any]:
    """LLaVA-NeXT preference record ``{"id", "image"?, "prompt", "chosen", "rejected", "meta"}``."""
    return {
        "id": item.id,
        **image_field(item),
        "prompt": item.prompt,
        "chosen": item.chosen,
        "rejected": item.rejected,
        "meta": record_meta(item),
    }


def to_sft_record(item: MMPRItem) -> dict[str, Any]:
    """LLaVA conversation record with the chosen response as the assistant turn."""
    conversations = [{"from": "human", "value": item.prompt}, {"from": "gpt", "value": item.chosen}]
    return {"id": item.id, **image_field(item), "conversations": conversations, "meta": record_meta(item)}
