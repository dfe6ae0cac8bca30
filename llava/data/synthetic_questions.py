"""Questions about a synthetic scene, each with its correct and a plausible-but-wrong answer.

One builder per question type (colour, shape, count, position; :data:`QUESTION_BUILDERS`) asks a
question that the scene answers unambiguously, or returns None when it cannot; :func:`feasible_questions`
asks every type it can. :mod:`llava.data.synthetic` turns them into LLaVA instruct turns and MMPR
preference pairs, :mod:`llava.data.world_bench` into the held-out benchmark. The count question counts
every object in the scene ("How many objects are there in the image?", answers 1-4 about equally often;
the stand-in for CV-Bench counting): the miniature's tiny tower carries colour, location and how many
objects there are but not shape, and counting one shape ("How many triangles ...?", most frequent shape)
stayed at the majority answer while counting every object lifts Stage 1 far above it (docs/DECISIONS.md,
issue 14). The position question still relates two objects; the one-object variants measured stayed at
the majority answer (same section).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava.data.synthetic_scene import (
    COLOURS,
    POSITION_MARGIN,
    REGION_NAMES,
    SHAPES,
    Scene,
    article,
    region_name,
    visible_centre,
    visible_masks,
)


@dataclass(frozen=True)
class Question:
    """A question about a scene with its correct and its plausible-but-wrong answer.

    ``answer``/``wrong`` are single words; ``reason``/``wrong_reason`` explain them in one or two
    sentences; ``statement`` is the correct answer as a sentence (LLaVA instruct data);
    ``targets`` are the indices of the objects the question is about.
    """

    question_type: str
    text: str
    answer: str
    wrong: str
    reason: str
    wrong_reason: str
    statement: str
    targets: tuple[int, ...]


def pick(rng: np.random.Generator, items: Sequence[Any]) -> Any:
    """One of ``items``, drawn uniformly with ``rng``."""
    return items[int(rng.integers(len(items)))]


def _wrong_value(rng: np.random.Generator, true: str, present: set[str], universe: Sequence[str]) -> str:
    """A wrong value: half the time another value in the scene (confusion), else an absent one (hallucination)."""
    confusable = sorted(present - {true})
    absent = [v for v in universe if v not in present]
    pool = confusable if confusable and (not absent or rng.random() < 0.5) else absent
    return pick(rng, pool)


def _count_sentence(places: Sequence[str]) -> str:
    if not places:
        return "I find no objects in the image."
    if len(places) == 1:
        return f"I find 1 object, {places[0]}."
    ones = [f"one {p}" for p in places]
    return f"I find {len(places)} objects: {', '.join(ones[:-1])} and {ones[-1]}."


def _objects_statement(count: str) -> str:
    return "There is 1 object." if count == "1" else f"There are {count} objects."


def _colour_question(
    scene: Scene, centres: list[tuple[float, float]], rng: np.random.Generator
) -> Question | None:
    shapes = [o.shape for o in scene.objects]
    candidates = [i for i, s in enumerate(shapes) if shapes.count(s) == 1]
    if not candidates:
        return None
    i = pick(rng, candidates)
    obj = scene.objects[i]
    wrong = _wrong_value(rng, obj.colour, {o.colour for o in scene.objects}, list(COLOURS))
    where = region_name(centres[i], scene.image_size)
    return Question(
        "colour",
        f"What colour is the {obj.shape}?",
        obj.colour,
        wrong,
        f"The {obj.shape} is {where}, and its fill colour is {obj.colour}.",
        f"The {obj.shape} is {where}, and its fill colour is {wrong}.",
        f"The {obj.shape} is {obj.colour}.",
        (i,),
    )


def _shape_question(
    scene: Scene, centres: list[tuple[float, float]], rng: np.random.Generator
) -> Question | None:
    colours = [o.colour for o in scene.objects]
    candidates = [i for i, c in enumerate(colours) if colours.count(c) == 1]
    if not candidates:
        return None
    i = pick(rng, candidates)
    obj = scene.objects[i]
    wrong = _wrong_value(rng, obj.shape, {o.shape for o in scene.objects}, SHAPES)
    where = region_name(centres[i], scene.image_size)
    return Question(
        "shape",
        f"What shape is the {obj.colour} object?",
        obj.shape,
        wrong,
        f"The only {obj.colour} object in the image is {where}, and its outline is {article(obj.shape)} {obj.shape}.",
        f"The only {obj.colour} object in the image is {where}, and its outline is {article(wrong)} {wrong}.",
        f"The {obj.colour} object is {article(obj.shape)} {obj.shape}.",
        (i,),
    )


def _count_question(scene: Scene, centres: list[tuple[float, float]], rng: np.random.Generator) -> Question:
    targets = tuple(range(len(scene.objects)))
    true = len(targets)
    wrong = pick(rng, [n for n in (true - 1, true + 1, true + 2) if n >= 0])
    places = [region_name(centres[i], scene.image_size) for i in targets]
    unused = [r for row in REGION_NAMES for r in row if r not in places]
    wrong_places = places[:wrong] + [pick(rng, unused) for _ in range(wrong - true)]
    return Question(
        "count",
        "How many objects are there in the image?",
        str(true),
        str(wrong),
        _count_sentence(places),
        _count_sentence(wrong_places),
        _objects_statement(str(true)),
        targets,
    )


def _position_question(
    scene: Scene, centres: list[tuple[float, float]], rng: np.random.Generator
) -> Question | None:
    names = [o.phrase(with_size=False) for o in scene.objects]
    unique = [i for i, n in enumerate(names) if names.count(n) == 1]
    margin = POSITION_MARGIN * scene.image_size
    pairs = [
        (i, j) for i in unique for j in unique if i != j and abs(centres[i][0] - centres[j][0]) >= margin
    ]
    if not pairs:
        return None
    i, j = pick(rng, pairs)
    a, b = names[i], names[j]
    left = centres[i][0] < centres[j][0]
    side, other = ("to the left of", "to the right of") if left else ("to the right of", "to the left of")
    where_a = region_name(centres[i], scene.image_size)
    where_b = region_name(centres[j], scene.image_size)
    seen = f"The {a} is {where_a} and the {b} is {where_b}, so the {a} is"
    return Question(
        "position",
        f"Is the {a} to the left of the {b}?",
        "yes" if left else "no",
        "no" if left else "yes",
        f"{seen} {side} the {b}.",
        f"{seen} {other} the {b}.",
        f"{'Yes' if left else 'No'}, the {a} is {side} the {b}.",
        (i, j),
    )


QUESTION_BUILDERS: dict[
    str, Callable[[Scene, list[tuple[float, float]], np.random.Generator], Question | None]
] = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "position": _position_question,
}


def candidate_statement(question: Question, value: str) -> str:
    """The answer ``value`` to ``question`` as the sentence Stage 1b teaches (``Question.statement``).

    ``"The circle is red."``, ``"The red object is a star."``, ``"There are 2 objects."``, ``"No, the red
    circle is to the right of the blue star."``; for the true answer it equals ``question.statement``.
    """
    kind = question.question_type
    if kind == "colour":
        shape = re.fullmatch(r"What colour is the (.+)\?", question.text)
        return f"The {_group(shape, question)} is {value}."
    if kind == "shape":
        colour = re.fullmatch(r"What shape is the (.+) object\?", question.text)
        return f"The {_group(colour, question)} object is {article(value)} {value}."
    if kind == "count":
        _group(re.fullmatch(r"(How many objects are there in the image)\?", question.text), question)
        return _objects_statement(value)
    if kind == "position":
        pair = re.fullmatch(r"Is the (.+) to the left of the (.+)\?", question.text)
        a, b = _group(pair, question), str(pair.group(2))
        side = "to the left of" if value == "yes" else "to the right of"
        return f"{value.capitalize()}, the {a} is {side} the {b}."
    raise ValueError(f"unknown question type {kind!r}")


def _group(match: re.Match | None, question: Question) -> str:
    if match is None:
        raise ValueError(f"{question.question_type} question {question.text!r} does not match its template")
    return match.group(1)


def feasible_questions(scene: Scene, rng: np.random.Generator) -> dict[str, Question]:
    """One question per type that the scene can answer unambiguously, keyed by type."""
    centres = [visible_centre(v) for v in visible_masks(scene)]
    built = {name: build(scene, centres, rng) for name, build in QUESTION_BUILDERS.items()}
    return {name: q for name, q in built.items() if q is not None}
