"""The miniature as an instrument (issue 14): a reduced Stage 0 + Stage 1 run must learn to see.

On a small colour-labelled world (32-px images): Stage 0 pretrains the tiny tower, Stage 1 trains
projector, LLM and tower on one colour question per training scene (the demo's instruct data,
reduced to the question this check asks so that it learns within CI time), then held-out colour
questions are answered by forced choice (lowest NLL among the six candidate statements). The run must beat the
always-majority answer, and the same model shown another scene's image must do worse: the answers
rest on the image. Margins come from measured seed spread (docs/DECISIONS.md, "Instrument check").
A regression that silently stops learning (no gradient to a part, a projector never loaded, a
broken collator) fails here.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from llava.data.synthetic import feasible_questions, generate_world
from llava.data.synthetic_scene import COLOURS, scene_from_dict
from llava.data.tokenization import tokenize_conversation
from llava.model.builder import load_model
from llava.tiny import TinySizes, write_tiny_presets
from llava.train.stage0 import Stage0Config, pretrain_tower

pytestmark = pytest.mark.slow

IMAGE_SIZE, NUM_TRAIN, NUM_VAL = 32, 600, 120
SIZES = TinySizes(vision_hidden=64, vision_layers=4, patch_size=8, llm_hidden=128, llm_layers=4)
STAGE1_FLAGS = [
    "--conv_template", "qwen_1_5", "--loss_type", "sft", "--reference", "none",
    "--mm_tunable_parts", "mm_vision_tower,mm_mlp_adapter,mm_language_model",
    "--learning_rate", "1e-3", "--mm_vision_tower_lr", "2e-4", "--lr_scheduler_type", "cosine",
    "--warmup_steps", "0.03", "--per_device_train_batch_size", "16", "--max_steps", "200",
    "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--dataloader_num_workers", "0",
]  # fmt: skip


def colour_questions(world: Path, split: str):
    """(scene id, colour question) for each scene of ``split`` that has one; the question rng draws over
    every scene in file order, so both record builders below see the same questions."""
    rng = np.random.default_rng(0)
    for line in (world / "scenes.jsonl").read_text().splitlines():
        row = json.loads(line)
        question = feasible_questions(scene_from_dict(row["scene"]), rng).get("colour")
        if row["split"] == split and question is not None:
            yield row["id"], question


def colour_records(world: Path, split: str) -> list[dict]:
    """One LLaVA record per scene of ``split`` that has a colour question: question, answer as a sentence."""
    return [
        {
            "id": scene_id,
            "image": f"images/{split}/{scene_id}.png",
            "conversations": [
                {"from": "human", "value": f"<image>\n{question.text}"},
                {"from": "gpt", "value": question.statement},
            ],
        }
        for scene_id, question in colour_questions(world, split)
    ]


def run_stage1(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """World, tiny presets, Stage 0 and Stage 1 under ``root`` (seeded weights, world and batch order)."""
    from llava.train.train import main

    world = root / "world"
    generate_world(world, seed=seed, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE)
    tiny = write_tiny_presets(
        root / "tiny", seed=seed, image_size=IMAGE_SIZE, towers=("siglip",), sizes=SIZES
    )
    tower = root / "stage0"
    pretrain_tower(
        Stage0Config(
            str(tiny["siglip"]), str(world), str(tower), steps=150, batch_size=32, seed=seed, log_every=0
        )
    )
    data = root / "colour.json"
    data.write_text(json.dumps(colour_records(world, "train")))
    out = root / "stage1"
    main(
        ["--llm", str(tiny["llm"]), "--vision_tower", str(tower), "--output_dir", str(out)]
        + ["--data_path", str(data), "--image_folder", str(world), *STAGE1_FLAGS, "--seed", str(seed)]
    )
    return world, out


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[Path, Path]:
    return run_stage1(tmp_path_factory.mktemp("instrument"))


def colour_choices(checkpoint: Path, world: Path, shuffle_images: bool) -> tuple[float, float]:
    """Forced-choice accuracy on held-out colour questions, and the always-majority answer's accuracy."""
    model, tokenizer, processor = load_model(checkpoint)
    model.eval()
    image_tokens = int(model.config.image_seq_length)
    records = colour_records(world, "val")
    images = [world / record["image"] for record in records]
    if shuffle_images:
        images = [images[i] for i in np.random.default_rng(1).permutation(len(images))]
    correct, answers = [], []
    for record, image in zip(records, images):
        question, statement = (turn["value"] for turn in record["conversations"])
        shape = question.removeprefix("<image>\nWhat colour is the ").removesuffix("?")
        answer = statement.removesuffix(".").split()[-1]
        pixels = processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")["pixel_values"]
        losses = {}
        for colour in COLOURS:
            ids, labels = tokenize_conversation(
                [(question, f"The {shape} is {colour}.")],
                tokenizer,
                "qwen_1_5",
                [image_tokens],
                512,
            )
            with torch.no_grad():
                output = model(
                    input_ids=torch.tensor([ids]), pixel_values=pixels, labels=torch.tensor([labels])
                )
            losses[colour] = float(output.loss)
        correct.append(min(losses, key=losses.get) == answer)
        answers.append(answer)
    majority = Counter(answers).most_common(1)[0][1] / len(answers)
    return float(np.mean(correct)), majority


def test_stage1_answers_colour_questions_from_the_image(stage1):
    world, checkpoint = stage1
    accuracy, majority = colour_choices(checkpoint, world, shuffle_images=False)
    shuffled, _ = colour_choices(checkpoint, world, shuffle_images=True)
    # Measured (seeds 0, 1): accuracy 46.2 / 44.7 %, majority 23.1 / 24.6 %, shuffled images 13.7 / 18.4 %;
    # the 12-point margins sit 8+ points below the smallest measured gap and ~2 binomial SEs above zero.
    assert accuracy > majority + 0.12, (accuracy, majority)
    assert accuracy > shuffled + 0.12, (accuracy, shuffled)


# Sign flip (issue 14): Stage 2 from the same Stage-1 model on held-in colour preference pairs (chosen: the
# right colour sentence; rejected: a wrong colour), once with DPO and once with the sign-flipped control loss
# (llava/train/losses.py dpo_sign_flipped), 20 steps at LR 5e-4. The flipped run must answer held-out colour
# questions worse by FLIP_MARGIN: on i14a's prototype Stage-1 model these settings gave 59.7 % (DPO) vs 17.0 %
# (flipped; majority 18.8 %), with 1.5-4 points of seed noise (docs/DECISIONS.md).
FLIP_MARGIN = 0.15
STAGE2_FLAGS = [
    "--conv_template", "qwen_1_5", "--reference", "precomputed", "--beta", "0.1",
    "--mm_tunable_parts", "mm_vision_tower,mm_mlp_adapter,mm_language_model",
    "--learning_rate", "5e-4", "--lr_scheduler_type", "cosine", "--warmup_steps", "0.03",
    "--per_device_train_batch_size", "16", "--max_steps", "20",
    "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--dataloader_num_workers", "0",
]  # fmt: skip


def colour_pairs(world: Path, split: str) -> list[dict]:
    """DPO records of the colour questions: the right colour sentence against one with a wrong colour."""
    return [
        {
            "id": scene_id,
            "image": f"images/{split}/{scene_id}.png",
            "prompt": f"<image>\n{question.text}",
            "chosen": question.statement,
            "rejected": question.statement.removesuffix(f"{question.answer}.") + f"{question.wrong}.",
        }
        for scene_id, question in colour_questions(world, split)
    ]


def test_sign_flipped_dpo_is_visible_in_colour_vqa(stage1, tmp_path_factory):
    from llava.train.train import main

    world, checkpoint = stage1
    root = tmp_path_factory.mktemp("stage2")
    data = root / "pairs.json"
    pairs = colour_pairs(world, "train")
    assert all(p["chosen"] != p["rejected"] and p["rejected"].startswith("The ") for p in pairs)
    data.write_text(json.dumps(pairs))
    accuracy = {}
    for loss in ("dpo", "dpo_sign_flipped"):
        out = root / loss
        main(
            ["--model_name_or_path", str(checkpoint), "--output_dir", str(out), "--loss_type", loss]
            + ["--data_path", str(data), "--image_folder", str(world), *STAGE2_FLAGS, "--seed", "0"]
        )
        accuracy[loss], _ = colour_choices(out, world, shuffle_images=False)
    assert accuracy["dpo_sign_flipped"] < accuracy["dpo"] - FLIP_MARGIN, accuracy
