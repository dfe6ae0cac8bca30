"""The miniature's benchmark suite: held-out world questions as local lmms-eval tasks.

The paper scores Stage-2 models on Cambrian's 16 benchmarks in four categories (DESIGN §5). The
miniature asks questions about held-out images of a synthetic world (:mod:`llava.data.synthetic`,
its ``val`` split by default: images no training record shows), one question type per category:

    question type  Cambrian category  stands for
    colour         General            MME-P / SEED attribute questions
    shape          OCR & Chart        recognising a small form (a glyph, a chart mark)
    position       Knowledge          a yes/no reasoning question over two objects
    count          Vision-centric     CV-Bench-2D counting (every object in the image)

Each type is written as two lmms-eval tasks that read local files only (``dataset_path`` is a
``DatasetDict.save_to_disk`` directory with ``load_from_disk: true``; no hub):

- ``world_<type>_choice``, forced choice (``output_type: multiple_choice``): every value of the
  type's answer set is a candidate continuation, written as the sentence Stage 1b teaches
  (:func:`candidate_statement`: "The circle is red.", "The circle is blue.", ...; the candidates of
  one question differ only in the answer words), and the prediction is the candidate of lowest
  summed NLL (``acc``, from the adapter's ``loglikelihood``). Chance is 1 / number of candidates.
- ``world_<type>_gen``, greedy generation (``generate_until``): the answer is read from the text
  (:func:`parse_answer`: the value after "answer is" if present, else the first value of the
  answer set that the text names) and scored by exact match (``exact_match``).

Questions are :func:`llava.data.synthetic_questions.feasible_questions` of each scene (one per type
the scene can ask unambiguously), drawn from ``SeedSequence([seed, image index])``: the same world and
seed give the same questions. Each type's answers are then balanced (:func:`balance_answers`: the
questions interleaved by answer value, cut where the most common answer would outnumber the runner-up),
so that always answering one value scores no more than the runner-up value would: on the small demo
(48 per type) every type comes out uniform (colour and shape 8 per value, position 24/24, count 12 each of
1-4: always-majority = chance). ``python -m llava.data.world_bench --world DIR --out_dir DIR``
writes ``data/<type>/``, ``tasks/*.yaml`` + ``tasks/utils.py`` (for ``lmms_eval --include_path``) and
``bench.json`` (per task: questions, the answer counts, the always-majority and chance accuracies, the
feasible questions and how many of them balancing dropped). The task functions that lmms-eval
calls live here (:func:`doc_to_visual`, :func:`doc_to_text`, :func:`process_choice`,
:func:`process_generation`).
"""

from __future__ import annotations

import argparse
import ast
import json
import logging
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llava.data.synthetic import QUESTION_TYPES, load_world
from llava.data.synthetic_questions import candidate_statement, feasible_questions
from llava.data.synthetic_scene import COLOURS, SHAPES, scene_from_dict

logger = logging.getLogger(__name__)

CATEGORY_OF: dict[str, str] = {
    "colour": "General",
    "shape": "OCR & Chart",
    "position": "Knowledge",
    "count": "Vision-centric",
}
"""Question type -> the Cambrian category it stands for (module docstring)."""
MODES: tuple[str, ...] = ("choice", "gen")
SPLIT = "test"
DEFAULT_MAX_NEW_TOKENS = 48

TASK_YAML = """\
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: {split}
output_type: {output_type}
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: target
{mode_block}metadata:
  - version: 1.0
"""

CHOICE_BLOCK = """\
doc_to_choice: choices
target_delimiter: ""
process_results: !function utils.process_choice
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

GEN_BLOCK = """\
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  until: ["<|im_end|>"]
process_results: !function utils.process_generation
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""

UTILS_PY = '''\
"""lmms-eval glue for the world benchmark tasks; the functions live in llava.data.world_bench."""

from llava.data.world_bench import doc_to_text, doc_to_visual, process_choice, process_generation  # noqa: F401
'''


def task_name(question_type: str, mode: str) -> str:
    """lmms-eval task name of one question type and mode, e.g. ``world_colour_choice``."""
    if question_type not in CATEGORY_OF or mode not in MODES:
        raise ValueError(f"unknown task ({question_type!r}, {mode!r}); types {QUESTION_TYPES}, modes {MODES}")
    return f"world_{question_type}_{mode}"


def answer_set(question_type: str, max_objects: int) -> list[str]:
    """Every answer a question of this type can have (the forced-choice candidates)."""
    sets = {
        "colour": list(COLOURS),
        "shape": list(SHAPES),
        "count": [str(n) for n in range(1, max_objects + 1)],  # every object is counted
        "position": ["yes", "no"],
    }
    if question_type not in sets:
        raise ValueError(f"unknown question type {question_type!r}; known: {sorted(sets)}")
    return sets[question_type]


def parse_answer(text: str, values: Sequence[str]) -> str | None:
    """The value a free-text answer gives: the one after "answer is", else the first one named."""
    words = {value.lower() for value in values}
    tokens = re.findall(r"[a-z]+|\d+", text.lower())
    for i in range(len(tokens) - 2):
        if tokens[i : i + 2] == ["answer", "is"] and tokens[i + 2] in words:
            return tokens[i + 2]
    return next((token for token in tokens if token in words), None)


def benchmark_questions(
    world_dir: Path, split: str = "val", seed: int = 0
) -> dict[str, list[dict[str, Any]]]:
    """Question type -> records ``{id, image, question, answer, choices, target, values}`` of ``split``."""
    world = load_world(world_dir)
    scenes_file = Path(world_dir) / world.files["scenes"]
    by_type: dict[str, list[dict[str, Any]]] = {t: [] for t in CATEGORY_OF}
    index = 0
    for line_number, line in enumerate(scenes_file.read_text(encoding="utf-8").splitlines(), 1):
        entry = json.loads(line)
        if entry.get("split") != split:
            continue
        try:
            scene = scene_from_dict(entry["scene"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"{scenes_file} line {line_number}: not a scene record ({exc})") from exc
        rng = np.random.default_rng(np.random.SeedSequence([seed, index]))
        index += 1
        for question_type, question in feasible_questions(scene, rng).items():
            values = answer_set(question_type, world.config.max_objects)
            if (
                question.answer not in values
                or candidate_statement(question, question.answer) != question.statement
            ):
                raise ValueError(
                    f"{scenes_file} line {line_number}: answer {question.answer!r} / {question.statement!r} "
                    f"does not fit the candidates {values} (has llava.data.synthetic changed its templates?)"
                )
            by_type[question_type].append(
                {
                    "id": f"{entry['id']}_{question_type}",
                    "image": f"images/{split}/{entry['id']}.png",
                    "question": question.text,
                    "answer": question.answer,
                    "choices": [candidate_statement(question, v) for v in values],
                    "target": question.statement,
                    "values": values,
                }
            )
    if index == 0:
        raise ValueError(f"{scenes_file}: no scene of split {split!r}")
    return by_type


def balance_answers(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` interleaved by answer and cut where one answer would outnumber all others.

    One record per answer value in turn (values in answer-set order, each value's records in their own
    order) for as many rounds as the second most common value has records: the most common value then
    has exactly as many records as the runner-up, so its share is at most 1/2 whenever two values occur,
    and every prefix (``per_type``) is as balanced as the records allow. Records whose answer is the only
    one are returned as they are. Deterministic: same records, same result.
    """
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in sorted(records, key=lambda r: r["values"].index(r["answer"])):
        groups.setdefault(record["answer"], []).append(record)
    if len(groups) < 2:
        return list(records)
    rounds = sorted(len(group) for group in groups.values())[-2]
    return [group[k] for k in range(rounds) for group in groups.values() if k < len(group)]


def write_world_bench(
    world_dir: str | Path,
    out_dir: str | Path,
    split: str = "val",
    seed: int = 0,
    per_type: int | None = None,
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
) -> dict[str, Any]:
    """Write the datasets, task YAMLs and ``bench.json`` (module docstring); returns bench.json's content.

    Each type's questions are :func:`balance_answers` of its feasible ones, of which ``per_type`` keeps
    the first N (None: all); bench.json counts the feasible questions and those balancing dropped.
    """
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature
    from datasets import Sequence as SequenceFeature

    world_dir, out = Path(world_dir), Path(out_dir)
    if per_type is not None and per_type < 1:
        raise ValueError(f"per_type must be >= 1 or None, got {per_type}")
    features = Features(
        {
            "id": Value("string"),
            "image": ImageFeature(),
            "question": Value("string"),
            "answer": Value("string"),
            "choices": SequenceFeature(Value("string")),
            "target": Value("string"),
            "values": SequenceFeature(Value("string")),
        }
    )
    (out / "tasks").mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"world": str(world_dir.resolve()), "split": split, "seed": seed, "tasks": {}}
    for question_type, feasible in benchmark_questions(world_dir, split, seed).items():
        balanced = balance_answers(feasible)
        records = balanced[:per_type] if per_type is not None else balanced
        if not records:
            raise ValueError(f"{world_dir}: no {question_type!r} question in split {split!r}")
        columns = {key: [r[key] for r in records] for key in features}
        columns["image"] = [str(world_dir / path) for path in columns["image"]]
        data = out / "data" / question_type
        DatasetDict({SPLIT: Dataset.from_dict(columns, features=features)}).save_to_disk(str(data))
        answers = Counter(columns["answer"])
        for mode in MODES:
            name = task_name(question_type, mode)
            block = CHOICE_BLOCK if mode == "choice" else GEN_BLOCK.format(max_new_tokens=max_new_tokens)
            output_type = "multiple_choice" if mode == "choice" else "generate_until"
            text = TASK_YAML.format(
                task=name, data=data.resolve(), split=SPLIT, output_type=output_type, mode_block=block
            )
            (out / "tasks" / f"{name}.yaml").write_text(text, encoding="utf-8")
            summary["tasks"][name] = {
                "question_type": question_type,
                "category": CATEGORY_OF[question_type],
                "mode": mode,
                "questions": len(records),
                "chance": 1.0 / len(records[0]["values"]),
                "majority": answers.most_common(1)[0][1] / len(records),
                "answers": {value: answers[value] for value in records[0]["values"]},
                "feasible": len(feasible),
                "dropped_by_balancing": len(feasible) - len(balanced),
            }
    (out / "tasks" / "utils.py").write_text(UTILS_PY, encoding="utf-8")
    (out / "bench.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary


# ---------------------------------------------------------------- functions lmms-eval calls


def doc_to_visual(doc: dict[str, Any]) -> list[Image.Image]:
    return [doc["image"].convert("RGB")]


def doc_to_text(doc: dict[str, Any], lmms_eval_specific_kwargs: dict | None = None) -> str:
    return doc["question"]


def _nll(response: Any, where: str) -> float:
    # lmms-eval 0.7.3 hands multiple_choice results to process_results as the strings of the model's
    # (nll, is_greedy) tuples (its own default scoring then fails to unpack them); accept both forms.
    try:
        value = ast.literal_eval(response) if isinstance(response, str) else response
    except (ValueError, SyntaxError):
        value = None
    if not isinstance(value, (tuple, list)) or not value or not isinstance(value[0], (int, float)):
        raise ValueError(f"{where}: expected an (nll, is_greedy) loglikelihood result, got {response!r}")
    return float(value[0])


def process_choice(doc: dict[str, Any], results: Sequence[Any]) -> dict[str, float]:
    """Forced choice: correct when the target is the candidate of lowest summed NLL."""
    where = f"world question {doc['id']}"
    if len(results) != len(doc["choices"]):
        raise ValueError(f"{where}: {len(results)} loglikelihood results for {len(doc['choices'])} choices")
    nlls = [_nll(response, where) for response in results]
    return {"acc": float(doc["choices"][int(np.argmin(nlls))] == doc["target"])}


def process_generation(doc: dict[str, Any], results: Sequence[str]) -> dict[str, float]:
    """Exact match of the value parsed from the greedy answer (:func:`parse_answer`)."""
    return {"exact_match": float(parse_answer(results[0], doc["values"]) == doc["answer"])}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m llava.data.world_bench", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--world", required=True, type=Path, help="a world written by llava.data.synthetic")
    parser.add_argument("--out_dir", required=True, type=Path, help="where data/, tasks/ and bench.json go")
    parser.add_argument("--split", default="val", help="world split to ask about (default: held-out val)")
    parser.add_argument("--seed", type=int, default=0, help="question seed")
    parser.add_argument("--per_type", type=int, default=None, help="first N questions of each type")
    parser.add_argument(
        "--max_new_tokens", type=int, default=DEFAULT_MAX_NEW_TOKENS, help="greedy answer length limit"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = write_world_bench(
        args.world, args.out_dir, args.split, args.seed, args.per_type, args.max_new_tokens
    )
    print(json.dumps({name: task["questions"] for name, task in summary["tasks"].items()}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
