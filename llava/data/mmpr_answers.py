"""Ground truth for GRPO from MMPR items: the `answer` the verifiable rewards check (issue 16).

An MMPR-v1.2 line has a question, a chosen (correct) and a rejected response, and no separate answer.
`derive_answer` takes it, first match wins:

1. the line's own `answer` key (the synthetic world writes one for every question), with its
   `answer_format` when given, else the format inferred as below;
2. the chosen response's stated final answer (`\\boxed{X}` or "the answer is X",
   llava.train.rewards.explicit_answer), or the whole chosen response when it is at most
   `SHORT_WORDS` words; its format is
   - `multiple_choice` when the question lists at least two lettered options ("A." / "(A)" at the
     start of a line) and the answer is one of their letters,
   - `number` when it is a number,
   - `short` when it is at most `SHORT_WORDS` words;
3. otherwise none: a free-form answer (a description, an explanation with no stated final answer, a
   long stated answer) cannot be checked by exact match. Such items are left out of the GRPO json and
   listed in the report with their reason (`no_answer`), counted per reason.

The GRPO record (llava.data.records.PromptRecord): `{"id", "image"?, "prompt", "answer",
"answer_format", "box"?, "meta"}`, with the DPO/SFT records' id, image and prompt, so the three runs
share ids.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from llava.data.mmpr_input import MMPRItem, image_field, record_meta
from llava.data.records import ANSWER_FORMATS
from llava.train.rewards import choice_letter, explicit_answer, parse_number

SHORT_WORDS = 5
_OPTION = re.compile(r"^\s*\(?([A-Z])[.)]\s+\S", re.MULTILINE)


def option_letters(question: str) -> set[str]:
    """Letters of the lettered options listed in a question (empty unless there are at least two)."""
    letters = set(_OPTION.findall(question))
    return letters if len(letters) >= 2 else set()


def infer_format(answer: str, question: str) -> str | None:
    """`multiple_choice`, `number` or `short` for a final answer (see module docstring), or None."""
    letter = choice_letter(answer)
    if letter is not None and letter in option_letters(question):
        return "multiple_choice"
    if parse_number(answer) is not None:
        return "number"
    if 0 < len(answer.split()) <= SHORT_WORDS:
        return "short"
    return None


def derive_answer(item: MMPRItem) -> tuple[str, str] | str:
    """(answer, answer_format) of an item, or the reason none can be derived."""
    given = item.extra.get("answer")
    if given is not None and str(given).strip():
        answer = str(given).strip()
        answer_format = item.extra.get("answer_format") or infer_format(answer, item.prompt) or "short"
        if answer_format not in ANSWER_FORMATS:
            return f"answer_format {answer_format!r} is not one of {ANSWER_FORMATS}"
        return answer, answer_format
    stated = explicit_answer(item.chosen)
    answer = stated if stated is not None else item.chosen.strip()
    if stated is None and len(answer.split()) > SHORT_WORDS:
        return f"free-form chosen response ({len(answer.split())} words, no stated final answer)"
    answer_format = infer_format(answer, item.prompt)
    if answer_format is None:
        return f"stated final answer is not a letter, a number or at most {SHORT_WORDS} words"
    if answer_format == "multiple_choice":
        answer = choice_letter(answer)
    return answer, answer_format


def to_grpo_record(item: MMPRItem, answer: str, answer_format: str) -> dict[str, Any]:
    record = {"id": item.id, **image_field(item), "prompt": item.prompt, "answer": answer}
    record["answer_format"] = answer_format
    box = item.extra.get("box")
    if isinstance(box, list) and len(box) == 4 and all(isinstance(v, int | float) for v in box):
        record["box"] = box
    record["meta"] = record_meta(item)
    return record


def grpo_records(items: list[MMPRItem]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The GRPO records of the items with a derivable answer (same order), and the report section:
    how many were written, per format, and every item without one, by id and reason."""
    records, missing = [], []
    for item in items:
        derived = derive_answer(item)
        if isinstance(derived, str):
            missing.append({"id": item.id, "reason": derived})
        else:
            records.append(to_grpo_record(item, *derived))
    report = {
        "written": len(records),
        "by_format": dict(Counter(record["answer_format"] for record in records)),
        "no_answer": len(missing),
        "no_answer_by_reason": dict(Counter(row["reason"].split(" (")[0] for row in missing)),
        "no_answer_items": missing,
    }
    return records, report
