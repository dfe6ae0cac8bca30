"""Questions about a synthetic scene, each with its correct and a plausible-but-wrong answer.

One builder per question type (colour, shape, count, position; :data:`QUESTION_BUILDERS`) asks a
question that the scene answers unambiguously, or returns None when it cannot; :func:`feasible_questions`
asks every type it can. :mod:`llava.data.synthetic` turns them into LLaVA instruct turns and MMPR
preference pairs, :mod:`llava.data.world_bench` into the held-out benchmark. Count and position ask
what the miniature's tiny tower carries (colour, location, how many objects; it does not tell shapes
apart, docs/DECISIONS.md, issue 14): the count question counts every object in the scene ("How many
objects are there in the image?", answers 1-4 about equally often, the stand-in for CV-Bench counting),
and the position question asks whether the one object of a colour lies on the left side of the image,
asked only about objects in the left or right third (the middle third is a margin). Counting one shape
("How many triangles ...?") and relating two objects ("Is the red circle to the left of the blue
square?") stayed at the majority answer because they need the shape the tower does not see.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from llava.data.synthetic_scene import (
    COLOURS,
    REGION_NAMES,
    SHAPES,
    Scene,
    article,
    region_cell,
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
        "There is 1 object." if true == 1 else f"There are {true} objects.",
        targets,
    )


def _position_question(
    scene: Scene, centres: list[tuple[float, float]], rng: np.random.Generator
) -> Question | None:
    colours = [o.colour for o in scene.objects]
    cells = [region_cell(c, scene.image_size) for c in centres]
    # the middle column is a margin: only objects clearly left or right of the image centre are asked about
    candidates = [i for i, c in enumerate(colours) if colours.count(c) == 1 and cells[i][1] != 1]
    if not candidates:
        return None
    i = pick(rng, candidates)
    (row, col), colour = cells[i], colours[i]
    left = col == 0
    where, mirrored = REGION_NAMES[row][col], REGION_NAMES[row][2 - col]
    side, other = ("left", "right") if left else ("right", "left")
    return Question(
        "position",
        f"Is the {colour} object on the left side of the image?",
        "yes" if left else "no",
        "no" if left else "yes",
        f"The only {colour} object in the image is {where}, so it is on the {side} side of the image.",
        f"The only {colour} object in the image is {mirrored}, so it is on the {other} side of the image.",
        f"{'Yes' if left else 'No'}, the {colour} object is on the {side} side of the image.",
        (i,),
    )


QUESTION_BUILDERS: dict[
    str, Callable[[Scene, list[tuple[float, float]], np.random.Generator], Question | None]
] = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "position": _position_question,
}


def feasible_questions(scene: Scene, rng: np.random.Generator) -> dict[str, Question]:
    """One question per type that the scene can answer unambiguously, keyed by type."""
    centres = [visible_centre(v) for v in visible_masks(scene)]
    built = {name: build(scene, centres, rng) for name, build in QUESTION_BUILDERS.items()}
    return {name: q for name, q in built.items() if q is not None}
