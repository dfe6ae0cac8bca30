"""The miniature as an instrument (issue 14): a reduced Stage 0 + Stage 1 run must learn to see.

On a small colour-labelled world (32-px images): Stage 0 pretrains the tiny tower, Stage 1 trains
projector, LLM and tower on the world's instruct conversations, then held-out colour questions are
answered by forced choice (lowest NLL among the six candidate statements). The run must beat the
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
    "--warmup_steps", "0.03", "--per_device_train_batch_size", "16", "--max_steps", "120",
    "--save_strategy", "no", "--report_to", "none", "--use_cpu", "True", "--dataloader_num_workers", "0",
    "--seed", "0",
]  # fmt: skip


@pytest.fixture(scope="module")
def stage1(tmp_path_factory) -> tuple[Path, Path]:
    from llava.train.train import main

    root = tmp_path_factory.mktemp("instrument")
    world = root / "world"
    generate_world(world, seed=0, num_train=NUM_TRAIN, num_val=NUM_VAL, image_size=IMAGE_SIZE)
    tiny = write_tiny_presets(root / "tiny", seed=0, image_size=IMAGE_SIZE, towers=("siglip",), sizes=SIZES)
    tower = root / "stage0"
    pretrain_tower(
        Stage0Config(str(tiny["siglip"]), str(world), str(tower), steps=150, batch_size=32, log_every=0)
    )
    out = root / "stage1"
    main(
        ["--llm", str(tiny["llm"]), "--vision_tower", str(tower), "--output_dir", str(out)]
        + ["--data_path", str(world / "llava" / "instruct.json"), "--image_folder", str(world), *STAGE1_FLAGS]
    )
    return world, out


def colour_choices(checkpoint: Path, world: Path, shuffle_images: bool) -> tuple[float, float]:
    """Forced-choice accuracy on held-out colour questions, and the always-majority answer's accuracy."""
    model, tokenizer, processor = load_model(checkpoint)
    model.eval()
    image_tokens = int(model.config.image_seq_length)
    rows = [json.loads(line) for line in (world / "scenes.jsonl").read_text().splitlines()]
    rows = [row for row in rows if row["split"] == "val"]
    rng = np.random.default_rng(0)
    images = [world / "images" / "val" / f"{row['id']}.png" for row in rows]
    shown = [images[i] for i in rng.permutation(len(images))] if shuffle_images else images
    correct, answers = [], []
    for row, image in zip(rows, shown):
        question = feasible_questions(scene_from_dict(row["scene"]), rng).get("colour")
        if question is None:
            continue
        shape = question.text.removeprefix("What colour is the ").removesuffix("?")
        pixels = processor(images=[Image.open(image).convert("RGB")], return_tensors="pt")["pixel_values"]
        losses = {}
        for colour in COLOURS:
            ids, labels = tokenize_conversation(
                [(f"<image>\n{question.text}", f"The {shape} is {colour}.")],
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
        correct.append(min(losses, key=losses.get) == question.answer)
        answers.append(question.answer)
    majority = Counter(answers).most_common(1)[0][1] / len(answers)
    return float(np.mean(correct)), majority


def test_stage1_answers_colour_questions_from_the_image(stage1):
    world, checkpoint = stage1
    accuracy, majority = colour_choices(checkpoint, world, shuffle_images=False)
    shuffled, _ = colour_choices(checkpoint, world, shuffle_images=True)
    assert accuracy > majority + 0.15, (accuracy, majority)
    assert accuracy > shuffled + 0.15, (accuracy, shuffled)
