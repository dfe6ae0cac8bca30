"""The miniature vision-language world: questions, answers and every dataset layout pivot reads.

:func:`generate_world` samples scenes (:mod:`llava.data.synthetic_scene`) deterministically from a
seed and writes the layout of docs/CONTRACTS.md §2: plain images, an ADE20K-style segmentation set,
an image-level ImageFolder set, PRH-style image-caption pairs, LLaVA Stage-1a (caption) and
Stage-1b (multi-turn QA) records, and MMPR-v1.2-style preference data (DESIGN §3) whose chosen
answers are correct by construction and whose rejected answers are plausible but wrong
(hallucinated object, wrong attribute, wrong count). Chosen answers come in five styles
(``answer_type``): ``short`` (one word), ``statement`` (the answer sentence Stage 1b teaches, e.g.
``"The circle is red."``), ``medium`` (30-59 words, no tags), ``long`` (> 100 words, step by step) and
``think`` (``<think>...</think>`` tags), so that the paper's Under30 / NoThink / new-distribution
filters (Song et al. 2025, appendix E) have work to do. Every final answer is one value (colour, shape,
digit, yes/no): ``"Red."``, ``"The circle is red."`` or ``"... the answer is red."``.
The questions and their right and wrong answers come from :mod:`llava.data.synthetic_questions`.
Same seed, same bytes. Run ``python -m llava.data.synthetic --out_dir DIR`` to write a world.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import posixpath
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from llava.data.synthetic_questions import Question, candidate_statement, feasible_questions, pick
from llava.data.synthetic_scene import (
    BACKGROUND_COLOURS,
    COLOURS,
    LABEL_CLASSES,
    SHAPES,
    Scene,
    describe_scene,
    largest_object,
    list_objects,
    render_scene,
    sample_scene,
)

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
QUESTION_TYPES: tuple[str, ...] = ("colour", "shape", "count", "position")
ANSWER_STYLES: dict[str, float] = {"short": 0.2, "statement": 0.2, "medium": 0.2, "long": 0.2, "think": 0.2}
"""Style of a chosen/rejected pair (``answer_type``) and how often it is drawn. ``statement`` answers in
the sentence Stage 1b teaches and the world benchmark's candidates use ("The circle is red." vs "The
circle is blue."): without it no preference pair is in the benchmark's answer form, and DPO and its
sign-flipped control reached the benchmark only through a global shift of the answer distribution
(docs/DECISIONS.md, issue 14). One draw picks the style whatever the table holds, so the rest of the
world's text keeps its random stream."""
MEDIUM_MIN_WORDS = 30
ANSWER_VALUES: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "count": tuple(str(n) for n in range(1, len(COLOURS) + 1)),  # a scene has at most len(COLOURS) objects
    "position": ("yes", "no"),
}
"""Every answer a question of each type can have (MMPR lines' ``answer_values``, llava.train.rewards)."""

MMPR_DATASETS: dict[str, tuple[str, tuple[str, ...]]] = {
    "synth_attribute": ("../images", ("colour", "shape")),
    "synth_count": ("..", ("count",)),
    "synth_spatial": ("../images", ("position",)),
}
"""MMPR dataset name -> (``root`` relative to ``mmpr/``, question types it holds). The two root
styles are deliberate: image paths are relative to ``root``, as in MMPR-v1.2."""

SPLITS: dict[str, tuple[str, str]] = {"train": ("training", "train"), "val": ("validation", "val")}
"""World split -> (ADE20K split name, ImageFolder split name)."""


def format_answer(question: Question, style: str, background: str, correct: bool) -> str:
    """The chosen (``correct``) or rejected response to ``question`` in an ``ANSWER_STYLES`` style."""
    answer = question.answer if correct else question.wrong
    reason = question.reason if correct else question.wrong_reason
    if style == "short":
        return f"{answer.capitalize()}."
    if style == "statement":
        return candidate_statement(question, answer)
    if style == "medium":
        check = "To be sure, I looked at this part of the image once more."
        if len(f"{reason} {check}".split()) < MEDIUM_MIN_WORDS - 5:
            check = f"{check} I compared it with the nearby objects and {background}."
        return f"{reason} {check} So the answer is {answer}."
    if style == "think":
        return (
            f"<think>\n{reason} Let me look at the outline and the fill colour once more before I answer. "
            f"The observation holds.\n</think>\nThe answer is {answer}."
        )
    if style == "long":
        return (
            "Let me answer this step by step. Step 1: I look at the whole image. It shows flat coloured "
            f"shapes on {background}, so I first need to find the part of the image that the question "
            f"asks about before answering. Step 2: {reason} Step 3: I check this again by comparing the "
            "region with its surroundings, making sure that no other object with the same description is "
            "hidden behind another one or placed next to it, and that the background does not change how "
            "the colours and the outlines look. Step 4: I put these observations together into one answer "
            f"to the question that was asked. Therefore, the answer is {answer}."
        )
    raise ValueError(f"unknown answer style {style!r}; known styles: {sorted(ANSWER_STYLES)}")


def union_box(scene: Scene, targets: Sequence[int]) -> list[int]:
    """``[x0, y0, x1, y1]`` (``x1``/``y1`` exclusive) covering the full silhouettes of ``targets``."""
    boxes = np.array([scene.objects[i].bbox for i in targets])
    return [int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()), int(boxes[:, 3].max())]


def make_preference_question(
    scene: Scene, rng: np.random.Generator, question_type: str | None = None, style: str | None = None
) -> dict[str, Any]:
    """An MMPR-style record ``{question, chosen, rejected, box, answer_type, question_type, answer...}``.

    ``question_type`` (one of :data:`QUESTION_TYPES`) and ``style`` (one of :data:`ANSWER_STYLES`)
    are drawn with ``rng`` when None; a ``question_type`` the scene cannot ask raises ValueError.
    """
    if question_type is not None and question_type not in QUESTION_TYPES:
        raise ValueError(f"unknown question type {question_type!r}; known types: {QUESTION_TYPES}")
    if style is not None and style not in ANSWER_STYLES:
        raise ValueError(f"unknown answer style {style!r}; known styles: {sorted(ANSWER_STYLES)}")
    feasible = feasible_questions(scene, rng)
    if question_type is None:
        question_type = pick(rng, list(feasible))
    if question_type not in feasible:
        raise ValueError(
            f"question type {question_type!r} is not possible for this scene; possible: {list(feasible)}"
        )
    if style is None:
        style = str(rng.choice(list(ANSWER_STYLES), p=list(ANSWER_STYLES.values())))
    question = feasible[question_type]
    background = scene.background.describe()
    return {
        "question": f"<image>\n{question.text}",
        "chosen": format_answer(question, style, background, correct=True),
        "rejected": format_answer(question, style, background, correct=False),
        "box": union_box(scene, question.targets),
        "answer_type": style,
        "question_type": question_type,
        "answer": question.answer,  # GRPO ground truth (llava.train.rewards)
        "answer_format": "number" if question_type == "count" else "short",
        "answer_values": list(ANSWER_VALUES[question_type]),
    }


def make_instruct_conversation(scene: Scene, rng: np.random.Generator, max_turns: int = 4) -> list[dict]:
    """LLaVA conversation turns: 2..``max_turns`` distinct questions with correct sentence answers."""
    pairs = [(q.text, q.statement) for q in feasible_questions(scene, rng).values()]
    pairs.append(("Describe the image briefly.", f"{describe_scene(scene).capitalize()}."))
    order = rng.permutation(len(pairs))[: int(rng.integers(2, min(max_turns, len(pairs)) + 1))]
    turns: list[dict] = []
    for k, index in enumerate(order):
        question, answer = pairs[int(index)]
        turns.append({"from": "human", "value": f"<image>\n{question}" if k == 0 else question})
        turns.append({"from": "gpt", "value": answer})
    return turns


@dataclass(frozen=True)
class WorldConfig:
    """What :func:`generate_world` builds; validated on creation."""

    seed: int = 0
    num_train: int = 200
    num_val: int = 50
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    questions_per_image: int = 2
    jpeg_quality: int = 95
    label: str = "colour"
    """ImageFolder label (of the largest object) and ADE classes: ``"colour"`` or ``"shape"``."""

    def __post_init__(self) -> None:
        if self.label not in LABEL_CLASSES:
            raise ValueError(f"label must be one of {sorted(LABEL_CLASSES)}, got {self.label!r}")
        if self.num_train < 1 or self.num_val < 1:
            raise ValueError(f"num_train and num_val must be >= 1, got {self.num_train}, {self.num_val}")
        if self.image_size < 32:
            raise ValueError(
                f"image_size must be >= 32 so small shapes stay recognisable, got {self.image_size}"
            )
        if not 1 <= self.min_objects <= self.max_objects <= len(COLOURS):
            raise ValueError(
                f"need 1 <= min_objects <= max_objects <= {len(COLOURS)}, got {self.min_objects}, {self.max_objects}"
            )
        if not 1 <= self.questions_per_image <= len(QUESTION_TYPES):
            raise ValueError(
                f"questions_per_image must be in 1..{len(QUESTION_TYPES)}, got {self.questions_per_image}"
            )
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {self.jpeg_quality}")


@dataclass
class WorldSummary:
    """What a world holds; ``world.json`` stores :meth:`to_dict` (everything but ``root``)."""

    root: Path
    config: WorldConfig
    classes: list[str]
    labels: list[str]
    colours: dict[str, list[int]]
    background_colours: dict[str, list[int]]
    counts: dict[str, int]
    files: dict[str, str]
    mmpr_datasets: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("root")
        return {"format_version": FORMAT_VERSION, **data}


def load_world(root: str | Path) -> WorldSummary:
    """Read ``<root>/world.json`` written by :func:`generate_world`."""
    path = Path(root) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; write a world with python -m llava.data.synthetic")
    data = json.loads(path.read_text())
    if data.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {data.get('format_version')} != {FORMAT_VERSION}")
    data.pop("format_version")
    return WorldSummary(root=Path(root), **{**data, "config": WorldConfig(**data["config"])})


WORLD_FILES: dict[str, str] = {
    "images": "images",
    "ade_images": "ade/images",
    "ade_annotations": "ade/annotations",
    "ade_classes": "ade/classes.json",
    "imagefolder": "imagefolder",
    "prh": "prh/prh.jsonl",
    "pretrain": "llava/pretrain.json",
    "instruct": "llava/instruct.json",
    "mmpr_meta": "mmpr/meta.json",
    "scenes": "scenes.jsonl",
}
"""Named entries of a world, relative to its root (``world.json`` ``files``)."""

_TOP_LEVEL = ("images", "ade", "imagefolder", "prh", "llava", "mmpr", "scenes.jsonl", "world.json")


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{out} is not empty; pass overwrite=True (--overwrite) to replace a world there"
        )
    for name in _TOP_LEVEL:
        target = out / name
        if target.is_dir():
            shutil.rmtree(target)
        elif target.exists():
            target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _encode(image: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _write(path: Path, data: bytes | str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        path.write_text(data, encoding="utf-8")
    else:
        path.write_bytes(data)


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _write_image_files(out: Path, split: str, image_id: str, scene: Scene, config: WorldConfig) -> str:
    """Write the scene's PNG, ADE20K JPEG + annotation and ImageFolder copy; return its label."""
    ade_split, folder_split = SPLITS[split]
    image, mask = render_scene(scene, config.label)
    label = scene.objects[largest_object(scene)].label(config.label)
    png = _encode(image, "PNG")
    _write(out / "images" / split / f"{image_id}.png", png)
    _write(out / "imagefolder" / folder_split / label / f"{image_id}.png", png)
    _write(
        out / "ade/images" / ade_split / f"{image_id}.jpg",
        _encode(image, "JPEG", quality=config.jpeg_quality),
    )
    _write(out / "ade/annotations" / ade_split / f"{image_id}.png", _encode(Image.fromarray(mask), "PNG"))
    return label


def _mmpr_rows(
    scene: Scene, image_path: str, rng: np.random.Generator, questions_per_image: int
) -> list[tuple[str, dict]]:
    """``(dataset name, annotation line)`` for up to ``questions_per_image`` distinct question types."""
    feasible = sorted(feasible_questions(scene, rng), key=QUESTION_TYPES.index)
    picked = sorted(int(k) for k in rng.permutation(len(feasible))[:questions_per_image])
    rows = []
    for k in picked:
        record = make_preference_question(scene, rng, question_type=feasible[k])
        name = next(n for n, (_, types) in MMPR_DATASETS.items() if record["question_type"] in types)
        root_in_world = posixpath.normpath(posixpath.join("mmpr", MMPR_DATASETS[name][0]))
        rows.append((name, {"image": posixpath.relpath(image_path, root_in_world), **record}))
    return rows


def generate_world(
    out_dir: str | Path,
    seed: int = 0,
    num_train: int = 200,
    num_val: int = 50,
    image_size: int = 64,
    *,
    min_objects: int = 1,
    max_objects: int = 4,
    questions_per_image: int = 2,
    jpeg_quality: int = 95,
    label: str = "colour",
    overwrite: bool = False,
) -> WorldSummary:
    """Write a world to ``out_dir`` (layout: docs/CONTRACTS.md §2) and return its summary.

    Image ``i`` of split ``s`` is drawn from ``SeedSequence([seed, split_index, i])``, so a world
    is a pure function of its arguments. Train images feed the LLaVA and MMPR records
    (``questions_per_image`` preference questions of distinct types each); PRH pairs cover both
    splits. Besides the contract's files, ``scenes.jsonl`` stores every scene (``Scene.to_dict``)
    with its id, split, label and caption. ``label`` picks the ImageFolder label and the ADE classes.
    """
    config = WorldConfig(
        seed,
        num_train,
        num_val,
        image_size,
        min_objects,
        max_objects,
        questions_per_image,
        jpeg_quality,
        label,
    )
    out = Path(out_dir)
    _prepare(out, overwrite)
    pretrain: list[dict] = []
    instruct: list[dict] = []
    prh: list[dict] = []
    scenes: list[dict] = []
    mmpr: dict[str, list[dict]] = {name: [] for name in MMPR_DATASETS}
    for split_index, (split, count) in enumerate((("train", num_train), ("val", num_val))):
        for index in range(count):
            scene_seq, text_seq = np.random.SeedSequence([seed, split_index, index]).spawn(2)
            scene = sample_scene(np.random.default_rng(scene_seq), image_size, min_objects, max_objects)
            image_id = f"{split}_{index:06d}"
            image_path = f"images/{split}/{image_id}.png"
            label = _write_image_files(out, split, image_id, scene, config)
            caption = describe_scene(scene)
            prh.append({"image": f"../{image_path}", "text": [caption, list_objects(scene)]})
            scenes.append(
                {"id": image_id, "split": split, "label": label, "caption": caption, "scene": scene.to_dict()}
            )
            if split != "train":
                continue
            text_rng = np.random.default_rng(text_seq)
            caption_turns = [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": caption}]
            pretrain.append({"id": image_id, "image": image_path, "conversations": caption_turns})
            conversation = make_instruct_conversation(scene, text_rng)
            instruct.append({"id": image_id, "image": image_path, "conversations": conversation})
            for name, row in _mmpr_rows(scene, image_path, text_rng, questions_per_image):
                mmpr[name].append(row)
    meta = {
        name: {"root": root, "annotation": f"annotations/{name}.jsonl"}
        for name, (root, _) in MMPR_DATASETS.items()
    }
    _write(out / WORLD_FILES["ade_classes"], json.dumps(list(LABEL_CLASSES[config.label]), indent=2) + "\n")
    _write(out / WORLD_FILES["prh"], _jsonl(prh))
    _write(out / WORLD_FILES["pretrain"], json.dumps(pretrain, indent=2, ensure_ascii=False) + "\n")
    _write(out / WORLD_FILES["instruct"], json.dumps(instruct, indent=2, ensure_ascii=False) + "\n")
    _write(out / WORLD_FILES["mmpr_meta"], json.dumps(meta, indent=2) + "\n")
    for name, rows in mmpr.items():
        _write(out / "mmpr" / meta[name]["annotation"], _jsonl(rows))
    _write(out / WORLD_FILES["scenes"], _jsonl(scenes))
    counts = {
        "train_images": num_train,
        "val_images": num_val,
        "pretrain": len(pretrain),
        "instruct": len(instruct),
    }
    counts.update({"prh": len(prh), **{f"mmpr/{name}": len(rows) for name, rows in mmpr.items()}})
    summary = WorldSummary(
        root=out,
        config=config,
        classes=list(LABEL_CLASSES[config.label]),
        labels=list(LABEL_CLASSES[config.label][1:]),
        colours={k: list(v) for k, v in COLOURS.items()},
        background_colours={k: list(v) for k, v in BACKGROUND_COLOURS.items()},
        counts=counts,
        files=dict(WORLD_FILES),
        mmpr_datasets={name: f"mmpr/{entry['annotation']}" for name, entry in meta.items()},
    )
    _write(out / "world.json", json.dumps(summary.to_dict(), indent=2) + "\n")
    logger.info("wrote a synthetic world to %s: %s", out, summary.counts)
    return summary


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: write a world and print its counts as JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out_dir", required=True, help="directory to write the world into (must be empty)")
    parser.add_argument("--seed", type=int, default=0, help="world seed; same seed gives the same bytes")
    parser.add_argument("--num_train", type=int, default=200, help="number of training images")
    parser.add_argument("--num_val", type=int, default=50, help="number of validation images")
    parser.add_argument("--image_size", type=int, default=64, help="image side in pixels (>= 32)")
    parser.add_argument("--min_objects", type=int, default=1, help="fewest objects per scene")
    parser.add_argument("--max_objects", type=int, default=4, help="most objects per scene (<= 6)")
    parser.add_argument(
        "--questions_per_image",
        type=int,
        default=2,
        help="MMPR preference questions (distinct types) per train image",
    )
    parser.add_argument("--jpeg_quality", type=int, default=95, help="JPEG quality of ade/images")
    labels = sorted(LABEL_CLASSES)
    parser.add_argument("--label", choices=labels, default="colour", help="ImageFolder label and ADE classes")
    parser.add_argument("--overwrite", action="store_true", help="replace a world already in --out_dir")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    summary = generate_world(**vars(args))  # every CLI flag is a generate_world argument of the same name
    print(json.dumps({"root": str(summary.root), **summary.counts}, indent=2))


if __name__ == "__main__":
    main()
