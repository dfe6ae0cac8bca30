"""Verifiable rewards for GRPO: a registry of plain callables, like the loss registry.

A reward function is `fn(completions: list[str], records: list[dict]) -> list[float]`; `records[i]` is
the dataset record completion i answers (its ground truth `answer`, `answer_format` and, for grounding
questions, `box`). Add one by writing the function and an entry in `REWARDS`; `--reward_funcs
exact_match format` with `--reward_weights 1 0.5` combines them as a weighted sum.

Final-answer extraction (`extract_answer`), first match wins: `\\boxed{X}`, the last "the answer is X",
else the whole completion. Comparison by `answer_format`:
- `multiple_choice`: one letter; "(A)", "A.", "A)" and "A" match "A", but "A cat" does not;
- `number`: numeric value within a relative tolerance (1e-6 default), so "12" ≠ "2" and "3.0" = "3";
- `short`: case-, article- and punctuation-insensitive whole-string equality (never a substring).

`named_answer` reads the answer the way the miniature's world benchmark scores greedy answers
(llava.data.world_bench.parse_answer): the value after "answer is", else the first of the record's
`answer_values` (every answer its question can have; the synthetic world writes them) that the completion
names. It rewards the sentence answers Stage 1b teaches ("The circle is red."), which `exact_match` reads
as the whole sentence; naming every value earns nothing, since only the first named one counts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

from llava.data.records import ANSWER_FORMATS
from llava.data.world_bench import parse_answer

RewardFn = Callable[[list[str], list[dict]], list[float]]
NUMBER_TOLERANCE = 1e-6

_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
_ANSWER_IS = re.compile(r"the answer is[:\s]*(.+?)(?:[.!?]\s*$|[.!?]\s|\n|$)", re.IGNORECASE | re.DOTALL)
_CHOICE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_NUMBER = re.compile(r"^[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:e[-+]?\d+)?$", re.IGNORECASE)
_ARTICLES = {"a", "an", "the"}
_THINK = re.compile(r"^<think>.*?</think>\s*\S", re.DOTALL)


def explicit_answer(completion: str) -> str | None:
    """The last `\\boxed{X}`, else the last "the answer is X", stripped; None without either."""
    boxed = _BOXED.findall(completion)
    if boxed:
        return boxed[-1].strip()
    found = _ANSWER_IS.findall(completion)
    if found:
        return found[-1].strip()
    return None


def extract_answer(completion: str) -> str:
    """The final answer of a completion (see the module docstring), stripped."""
    explicit = explicit_answer(completion)
    return completion.strip() if explicit is None else explicit


def _normalise_text(text: str) -> str:
    words = re.sub(r"[^\w\s]", " ", text.lower()).split()
    return " ".join(w for w in words if w not in _ARTICLES)


def choice_letter(text: str) -> str | None:
    match = _CHOICE.match(text.strip())
    return match.group(1).upper() if match else None


def parse_number(text: str) -> float | None:
    text = text.strip().rstrip(".").replace(",", "")
    return float(text) if _NUMBER.match(text) else None


def answers_match(
    predicted: str, truth: str, answer_format: str, tolerance: float = NUMBER_TOLERANCE
) -> bool:
    """Whether an extracted answer equals the ground truth under `answer_format`."""
    if answer_format == "multiple_choice":
        guess, gold = choice_letter(predicted), choice_letter(truth)
        return guess is not None and guess == gold
    if answer_format == "number":
        guess, gold = parse_number(predicted), parse_number(truth)
        if guess is None or gold is None:
            return False
        return math.isclose(guess, gold, rel_tol=tolerance, abs_tol=tolerance)
    if answer_format == "short":
        return _normalise_text(predicted) == _normalise_text(truth) != ""
    raise ValueError(f"answer_format {answer_format!r}: choose one of {ANSWER_FORMATS}.")


def exact_match(completions: list[str], records: list[dict]) -> list[float]:
    """1 when the extracted final answer equals the record's `answer`, else 0."""
    return [
        float(answers_match(extract_answer(c), str(r["answer"]), r.get("answer_format", "short")))
        for c, r in zip(completions, records, strict=True)
    ]


def named_answer(completions: list[str], records: list[dict]) -> list[float]:
    """1 when the first of the record's `answer_values` that the completion names (or the one after
    "answer is") is its `answer`, else 0 (module docstring)."""
    scores = []
    for completion, record in zip(completions, records, strict=True):
        values = record.get("answer_values")
        if not values:
            raise ValueError(
                f"record {record.get('id')!r}: named_answer needs `answer_values` (the answers its question can "
                "have), as the synthetic world writes them; use exact_match for other data."
            )
        scores.append(float(parse_answer(completion, values) == str(record["answer"]).lower()))
    return scores


def format_reward(completions: list[str], records: list[dict]) -> list[float]:
    """1 when the answer is stated explicitly: a `\\boxed{}`, "the answer is X", a closed `<think>` block
    followed by text, or a one-line answer of at most five words."""
    scores = []
    for completion in completions:
        text = completion.strip()
        explicit = bool(_BOXED.search(text) or _ANSWER_IS.search(text) or _THINK.match(text))
        scores.append(float(explicit or (bool(text) and "\n" not in text and len(text.split()) <= 5)))
    return scores


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """Intersection over union of two [x0, y0, x1, y1] boxes (0 for empty ones)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union if union > 0 else 0.0


_BOX = re.compile(r"\[\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*,\s*(-?[\d.]+)\s*\]")


def iou_reward(completions: list[str], records: list[dict]) -> list[float]:
    """IoU of the last `[x0, y0, x1, y1]` box in the completion with the record's `box` (0 if none)."""
    scores = []
    for completion, record in zip(completions, records, strict=True):
        boxes = _BOX.findall(completion)
        if not boxes or record.get("box") is None:
            scores.append(0.0)
            continue
        scores.append(box_iou([float(v) for v in boxes[-1]], [float(v) for v in record["box"]]))
    return scores


REWARDS: dict[str, RewardFn] = {
    "exact_match": exact_match,
    "named_answer": named_answer,
    "format": format_reward,
    "iou": iou_reward,
}


def combined_rewards(
    names: Sequence[str], weights: Sequence[float] | None, completions: list[str], records: list[dict]
) -> tuple[list[float], dict[str, list[float]]]:
    """(weighted sum per completion, each function's rewards by name)."""
    unknown = [n for n in names if n not in REWARDS]
    if unknown:
        raise ValueError(f"unknown reward functions {unknown}: choose from {sorted(REWARDS)}.")
    weights = [1.0] * len(names) if weights is None else list(weights)
    if len(weights) != len(names):
        raise ValueError(f"{len(weights)} reward weights for {len(names)} reward functions.")
    parts = {n: REWARDS[n](completions, records) for n in names}
    total = [sum(w * parts[n][i] for n, w in zip(names, weights)) for i in range(len(completions))]
    return total, parts
