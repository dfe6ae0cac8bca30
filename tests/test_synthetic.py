"""Tests for the synthetic vision-language world (llava.data.synthetic, llava.data.synthetic_scene).

Answers and masks are checked against independent references: shapes re-derived from the pixels
(exact RGB values, scipy connected components, analytic circle/square geometry), never by calling
the generator's own answer code.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage

from llava.data.synthetic import (
    ANSWER_STYLES,
    WorldConfig,
    generate_world,
    load_world,
    main,
    make_preference_question,
)
from llava.data.synthetic_questions import feasible_questions
from llava.data.synthetic_scene import (
    BACKGROUND_COLOURS,
    COLOURS,
    NOISE_AMPLITUDE,
    SHAPES,
    Background,
    Scene,
    describe_scene,
    is_connected,
    make_object,
    render_scene,
    sample_scene,
    scene_from_dict,
)

NUM_TRAIN, NUM_VAL = 60, 20


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("world_a")
    generate_world(root, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, label="shape")  # masks name shapes
    return root


@pytest.fixture(scope="module")
def scenes() -> list[Scene]:
    sizes = [64] * 50 + [40] * 5 + [96] * 5
    return [sample_scene(np.random.default_rng(1000 + i), image_size=size) for i, size in enumerate(sizes)]


def _hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _rgb(image: np.ndarray, colour: tuple[int, int, int] | list[int]) -> np.ndarray:
    return (image == np.array(colour, dtype=np.uint8)).all(axis=-1)


def test_same_seed_same_bytes_different_seed_differs(world: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate_world(again, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, label="shape")
    first, second = _hashes(world), _hashes(again)
    assert len(first) > 4 * (NUM_TRAIN + NUM_VAL)
    assert first == second
    other = tmp_path / "other"
    main(["--out_dir", str(other), "--seed", "1", "--num_train", str(NUM_TRAIN), "--num_val", str(NUM_VAL)])
    third = _hashes(other)
    images = [k for k in first if k.startswith("images/")]
    assert sum(first[k] != third.get(k) for k in images) > 0.9 * len(images)
    for name in (
        "llava/pretrain.json",
        "llava/instruct.json",
        "prh/prh.jsonl",
        "mmpr/annotations/synth_count.jsonl",
    ):
        assert first[name] != third[name]


def test_background_palette_never_reaches_object_colours() -> None:
    t = np.linspace(0, 1, 256)[:, None]
    for a in BACKGROUND_COLOURS.values():
        for b in BACKGROUND_COLOURS.values():
            line = (1 - t) * np.array(a) + t * np.array(b)
            for colour in COLOURS.values():
                assert np.abs(line - np.array(colour)).max(axis=1).min() > NOISE_AMPLITUDE + 1


def test_silhouettes_match_analytic_geometry() -> None:
    size = 64
    ys, xs = np.mgrid[0:size, 0:size]
    white = Background("solid", ("white",))
    for cx, cy, r in [(20.0, 30.0, 10.0), (40.5, 25.25, 6.0), (32.0, 32.0, 9.5)]:
        references = {
            "circle": (xs - cx) ** 2 + (ys - cy) ** 2 <= r**2,
            "square": (np.abs(xs - cx) <= 0.8 * r) & (np.abs(ys - cy) <= 0.8 * r),
        }
        for shape, reference in references.items():
            obj = make_object(shape, "red", "large", (cx, cy), r, size)
            _, mask = render_scene(Scene(size, white, (obj,)))
            drawn = mask > 0
            # every boundary within one pixel of the analytic shape (PIL rounds vertices)
            assert not (drawn & ~ndimage.binary_dilation(reference, np.ones((3, 3)))).any()
            assert not (reference & ~ndimage.binary_dilation(drawn, np.ones((3, 3)))).any()
            assert _iou(drawn, reference) > 0.8


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / (a | b).sum())


def test_connectivity_check_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    for _ in range(200):
        region = rng.random((int(rng.integers(3, 20)), int(rng.integers(3, 20)))) < 0.6
        assert is_connected(region) == (ndimage.label(region)[1] == 1)


def test_masks_agree_with_drawn_objects(scenes: list[Scene]) -> None:
    for scene in scenes:
        image, mask = render_scene(scene)
        pixels = np.asarray(image)
        assert mask.dtype == np.uint8 and pixels.shape == (scene.image_size, scene.image_size, 3)
        alone = []
        for obj in scene.objects:
            solo_pixels = np.asarray(render_scene(Scene(scene.image_size, scene.background, (obj,)))[0])
            silhouette = _rgb(solo_pixels, COLOURS[obj.colour])
            ys, xs = np.nonzero(silhouette)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == obj.bbox  # tight box
            alone.append(silhouette)
        covered = np.zeros_like(mask, dtype=bool)
        for obj, silhouette in zip(reversed(scene.objects), reversed(alone)):
            visible = silhouette & ~covered
            assert visible.sum() >= 0.6 * silhouette.sum()
            assert (mask[visible] == SHAPES.index(obj.shape) + 1).all()
            assert _rgb(pixels, COLOURS[obj.colour])[visible].all()
            covered |= silhouette
        assert (mask[~covered] == 0).all() and (mask[covered] > 0).all()
        for colour in COLOURS.values():
            assert not _rgb(pixels, colour)[mask == 0].any()


def test_boxes_contain_object_pixels(scenes: list[Scene]) -> None:
    for scene in scenes:
        image, mask = render_scene(scene)
        pixels = np.asarray(image)
        for obj in scene.objects:
            inside = np.zeros_like(mask, dtype=bool)
            x0, y0, x1, y1 = obj.bbox
            inside[y0:y1, x0:x1] = True
            mine = (mask == SHAPES.index(obj.shape) + 1) & _rgb(pixels, COLOURS[obj.colour])
            same = [o for o in scene.objects if (o.shape, o.colour) == (obj.shape, obj.colour)]
            if len(same) == 1:
                assert mine.any() and not (mine & ~inside).any()


def _final_answer(text: str, question_type: str) -> str:
    body = re.sub(r"<think>.*?</think>", "", text, flags=re.S).strip()
    match = re.search(r"answer is (\w+)\.$", body) or re.fullmatch(r"(\w+)\.", body)
    if match is None:  # the statement style: the one value of the type the sentence names
        words = re.findall(r"[a-z]+|\d+", body.lower())
        named = [w for w in words if (w.isdigit() if question_type == "count" else w in VOCAB[question_type])]
        assert len(named) == 1, f"no single final answer in {text!r}"
        return named[0]
    return match[1].lower()


def _derive(question: str, pixels: np.ndarray, mask: np.ndarray) -> tuple[str, np.ndarray]:
    """Answer and the pixels it rests on, re-derived from the image and mask alone."""
    classes = ["unlabeled", *SHAPES]
    if question == "How many objects are there in the image?":
        count = sum(ndimage.label(mask == c, structure=np.ones((3, 3)))[1] for c in range(1, len(classes)))
        return str(count), mask > 0
    if m := re.fullmatch(r"What colour is the (\w+)\?", question):
        region = mask == classes.index(m[1])
        values = np.unique(pixels[region], axis=0)
        assert len(values) == 1, question
        return next(n for n, c in COLOURS.items() if tuple(values[0]) == c), region
    if m := re.fullmatch(r"What shape is the (\w+) object\?", question):
        region = _rgb(pixels, COLOURS[m[1]])
        ids = np.unique(mask[region])
        assert len(ids) == 1, question
        return classes[int(ids[0])], region
    if m := re.fullmatch(r"Is the (\w+) (\w+) to the left of the (\w+) (\w+)\?", question):
        a = (mask == classes.index(m[2])) & _rgb(pixels, COLOURS[m[1]])
        b = (mask == classes.index(m[4])) & _rgb(pixels, COLOURS[m[3]])
        assert a.any() and b.any(), question
        return ("yes" if np.nonzero(a)[1].mean() < np.nonzero(b)[1].mean() else "no"), a | b
    raise AssertionError(f"unexpected question {question!r}")


def _mmpr_records(world: Path) -> list[tuple[Path, dict]]:
    meta = json.loads((world / "mmpr/meta.json").read_text())
    records = []
    for entry in meta.values():
        for line in (world / "mmpr" / entry["annotation"]).read_text().splitlines():
            record = json.loads(line)
            records.append(((world / "mmpr" / entry["root"] / record["image"]).resolve(), record))
    return records


def _load(world: Path, image_path: Path) -> tuple[np.ndarray, np.ndarray]:
    mask_path = world / "ade/annotations/training" / f"{image_path.stem}.png"
    return np.asarray(Image.open(image_path).convert("RGB")), np.asarray(Image.open(mask_path))


VOCAB = {"colour": set(COLOURS), "shape": set(SHAPES), "position": {"yes", "no"}}


def _check_record(record: dict, pixels: np.ndarray, mask: np.ndarray) -> None:
    """Chosen = the pixel-derived answer, rejected = a wrong answer of the same kind, box covers it."""
    question = record["question"]
    assert question.startswith("<image>\n")
    truth, region = _derive(question.removeprefix("<image>\n"), pixels, mask)
    kind = record["question_type"]
    chosen, rejected = _final_answer(record["chosen"], kind), _final_answer(record["rejected"], kind)
    assert chosen == truth, record
    assert rejected != truth, record
    assert rejected.isdigit() if kind == "count" else rejected in VOCAB[kind]
    x0, y0, x1, y1 = record["box"]
    ys, xs = np.nonzero(region)
    assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1, record


def _check_style(record: dict) -> None:
    """short and statement < 30 words; medium 30-59 words; long > 100 words (no tags); think = one tag pair."""
    style = record["answer_type"]
    for text in (record["chosen"], record["rejected"]):
        words = len(text.split())
        tagged = "<think>" in text or "</think>" in text
        if style in ("short", "statement"):
            assert words < 30 and not tagged
        elif style == "medium":
            assert 30 <= words < 60 and not tagged, text
        elif style == "long":
            assert words > 100 and not tagged
        else:
            assert style == "think" and text.count("<think>") == 1 and text.count("</think>") == 1


def test_preference_answers_checked_against_pixels(world: Path) -> None:
    records = _mmpr_records(world)
    assert len(records) >= NUM_TRAIN
    for image_path, record in records:
        _check_record(record, *_load(world, image_path))
        _check_style(record)
    assert {r["question_type"] for _, r in records} == {"colour", "shape", "count", "position"}
    assert {r["answer_type"] for _, r in records} == set(ANSWER_STYLES)


def test_every_question_type_and_style_on_fresh_scenes(scenes: list[Scene]) -> None:
    rng = np.random.default_rng(0)
    asked = set()
    for scene in scenes:
        image, mask = render_scene(scene)
        for question_type in ("colour", "shape", "count", "position"):
            for style in ANSWER_STYLES:
                try:
                    record = make_preference_question(scene, rng, question_type=question_type, style=style)
                except ValueError as err:
                    assert "not possible" in str(err)
                    shapes = [o.shape for o in scene.objects]
                    colours = [o.colour for o in scene.objects]
                    if question_type == "colour":
                        assert all(shapes.count(x) > 1 for x in shapes)
                    elif question_type == "shape":
                        assert all(colours.count(x) > 1 for x in colours)
                    else:
                        assert question_type == "position"
                    continue
                asked.add(question_type)
                if question_type == "count":  # every object is counted
                    assert int(record["answer"]) == len(scene.objects)
                assert record["answer_type"] == style and record["question_type"] == question_type
                _check_record(record, np.asarray(image), mask)
                _check_style(record)
    assert asked == {"colour", "shape", "count", "position"}
    single = next(s for s in scenes if len(s.objects) == 1)
    with pytest.raises(ValueError, match="position"):
        make_preference_question(single, rng, question_type="position")
    with pytest.raises(ValueError, match="unknown question type"):
        make_preference_question(single, rng, question_type="size")


def test_count_counts_every_object() -> None:
    rng = np.random.default_rng(0)
    for n in range(1, 5):  # large stars side by side on the middle row
        objects = tuple(make_object("star", "red", "large", (8.0 + 16 * k, 32.0), 7.0, 64) for k in range(n))
        scene = Scene(64, Background("solid", ("white",)), objects)
        for _ in range(5):
            count = feasible_questions(scene, rng)["count"]
            assert (count.text, count.answer, count.targets) == (
                "How many objects are there in the image?",
                str(n),
                tuple(range(n)),
            )
            assert count.statement == ("There is 1 object." if n == 1 else f"There are {n} objects.")
            assert count.wrong != count.answer and count.reason.startswith(f"I find {n} object")
            wrong = int(count.wrong)
            assert count.wrong_reason.startswith(
                "I find no objects" if wrong == 0 else f"I find {wrong} object"
            )


def test_layout_matches_contract(world: Path) -> None:
    summary = load_world(world)
    assert summary.config.seed == 0 and summary.classes == ["unlabeled", *SHAPES]
    assert json.loads((world / "ade/classes.json").read_text()) == summary.classes
    for split, ade_split, folder_split, count in [
        ("train", "training", "train", NUM_TRAIN),
        ("val", "validation", "val", NUM_VAL),
    ]:
        pngs = sorted((world / "images" / split).glob("*.png"))
        assert len(pngs) == count
        folder = {p.name: p.parent.name for p in (world / "imagefolder" / folder_split).glob("*/*.png")}
        assert sorted(folder) == [p.name for p in pngs]
        for png in pngs:
            jpg = Image.open(world / "ade/images" / ade_split / f"{png.stem}.jpg")
            annotation = Image.open(world / "ade/annotations" / ade_split / png.name)
            assert jpg.format == "JPEG" and annotation.mode == "L" and jpg.size == annotation.size
            pixels = np.asarray(Image.open(png).convert("RGB")).astype(int)
            assert np.abs(np.asarray(jpg.convert("RGB")).astype(int) - pixels).mean() < 6
            mask = np.asarray(annotation)
            assert mask.max() < len(summary.classes)
            largest = {
                c: np.bincount(ndimage.label(mask == c)[0].ravel())[1:].max(initial=0) for c in range(1, 7)
            }
            assert (
                summary.classes[max(largest, key=largest.get)] == folder[png.name]
            )  # label = largest object
    for line in (world / "prh/prh.jsonl").read_text().splitlines():
        row = json.loads(line)
        assert (world / "prh" / row["image"]).is_file() and all(isinstance(t, str) and t for t in row["text"])
    pretrain = json.loads((world / "llava/pretrain.json").read_text())
    instruct = json.loads((world / "llava/instruct.json").read_text())
    assert len(pretrain) == len(instruct) == NUM_TRAIN
    for record in pretrain:
        assert (world / record["image"]).is_file()
        assert record["conversations"][0] == {"from": "human", "value": "<image>"}
        assert record["conversations"][1]["from"] == "gpt"
    for record in instruct:
        assert (world / record["image"]).is_file()
        turns = record["conversations"]
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2) and len(turns) >= 4
        assert turns[0]["value"].startswith("<image>\n")
        assert sum(t["value"].count("<image>") for t in turns) == 1
    meta = json.loads((world / "mmpr/meta.json").read_text())
    assert 2 <= len(meta) <= 3
    for image_path, record in _mmpr_records(world):
        assert image_path.is_file() and image_path.is_relative_to(world.resolve())
        assert {"image", "question", "chosen", "rejected", "box", "answer_type"} <= set(record)


def test_captions_and_instruct_answers_match_the_pixels(world: Path) -> None:
    scenes = {}
    for line in (world / "scenes.jsonl").read_text().splitlines():
        row = json.loads(line)
        scenes[row["id"]] = scene_from_dict(row["scene"])
    for record in json.loads((world / "llava/pretrain.json").read_text()):
        caption = record["conversations"][1]["value"]
        for obj in scenes[record["id"]].objects:
            assert f"{obj.size} {obj.colour} {obj.shape}" in caption
    for record in json.loads((world / "llava/instruct.json").read_text()):
        pixels, mask = _load(world, world / record["image"])
        _, rendered = render_scene(scenes[record["id"]])
        assert np.array_equal(rendered, mask)  # scenes.jsonl reproduces the written mask
        turns = record["conversations"]
        for question, answer in zip(turns[0::2], turns[1::2]):
            text = question["value"].removeprefix("<image>\n")
            if text == "Describe the image briefly.":
                assert answer["value"].lower() == describe_scene(scenes[record["id"]]) + "."
                continue
            truth, _ = _derive(text, pixels, mask)
            words = re.findall(r"\w+", answer["value"].lower())
            assert truth in words, (text, answer["value"])


def test_colour_world_labels_and_masks_name_colours(tmp_path: Path) -> None:
    summary = generate_world(tmp_path, seed=1, num_train=12, num_val=4)  # the default label: colour
    assert (
        summary.classes == ["unlabeled", *COLOURS] == json.loads((tmp_path / "ade/classes.json").read_text())
    )
    folder = {p.stem: p.parent.name for p in (tmp_path / "imagefolder").glob("*/*/*.png")}
    for png in sorted((tmp_path / "images").glob("*/*.png")):
        pixels = np.asarray(Image.open(png).convert("RGB"))
        split = "training" if png.parent.name == "train" else "validation"
        mask = np.asarray(Image.open(tmp_path / "ade/annotations" / split / png.name))
        areas = {}
        for k, (name, rgb) in enumerate(COLOURS.items(), start=1):
            assert np.array_equal(mask == k, _rgb(pixels, rgb)), (png.name, name)  # mask id k = colour k
            areas[name] = np.bincount(ndimage.label(mask == k)[0].ravel())[1:].max(initial=0)
        assert max(areas, key=areas.get) == folder[png.stem]  # label = colour of the largest object


def test_bad_arguments_fail_fast(world: Path) -> None:
    with pytest.raises(ValueError, match="image_size"):
        WorldConfig(image_size=16)
    with pytest.raises(ValueError, match="max_objects"):
        WorldConfig(max_objects=9)
    with pytest.raises(ValueError, match="label"):
        WorldConfig(label="size")
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_world(world, seed=0, num_train=2, num_val=1)
