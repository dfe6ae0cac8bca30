"""The lmms-eval adapter (llava/eval/lmms_adapter.py) and a real offline lmms-eval CLI run.

- Prompts: the adapter's prompt ids equal the training tokenisation's (`tokenize_conversation`) prompt.
- `generate_until` (square and anyres checkpoints, batched, left-padded, two generation-kwargs groups,
  one text-only and one two-image request) equals an unbatched greedy loop written here with plain
  forwards (no cache, no padding), cut at the `until` strings.
- `loglikelihood` equals the summed NLL from a plain forward, and `is_greedy` is true exactly for the
  greedy continuation.
- The real CLI (`python -m lmms_eval --model pivot`, found through the installed entry point) runs a
  local task written here (PIL images in a `DatasetDict.save_to_disk` dataset, utils.py with
  `doc_to_visual`/`doc_to_text`/`process_results`) and `analysis.benchmarks` reads its results JSON.
  The answers of 4 of the 6 questions are the model's own greedy answers (computed in-process first),
  so the expected scores are known by construction: exact match 4/6, pair accuracy 1/3.

The tiny LLM's weights are re-drawn with a large std so its greedy output depends on the image and
the question (the stock tiny init answers "\\n" to everything).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

pytest.importorskip("lmms_eval", reason="lmms-eval is not installed (the eval extra; see the Makefile)")

from lmms_eval.api.instance import Instance  # noqa: E402

from analysis.benchmark_samples import read_samples  # noqa: E402
from analysis.benchmarks import BENCHMARKS, aggregate, load_registry  # noqa: E402
from llava.data.tokenization import (  # noqa: E402
    IGNORE_INDEX,
    tokenize_conversation,
    tokenize_prompt,  # noqa: E402
)
from llava.eval import LMMS_EVAL_CLASS_PATH, LMMS_EVAL_MODEL_ID, lmms_eval_manifest  # noqa: E402
from llava.eval.lmms_adapter import PivotLlava, cut_at_stops, human_turn, left_pad  # noqa: E402
from llava.model.builder import ModelConfig, build_model, save_model  # noqa: E402
from llava.model.image_tokens import image_token_counter  # noqa: E402

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval" / "cambrian16.sh"
TASK = "pivot_shapes"
SPLIT = "test"
ASPECTS = ("square", "anyres_max_9")
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread (thread hand-offs dominate on a busy 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _noisy(model: torch.nn.Module, seed: int = 0) -> None:
    """Re-draw every matrix outside the vision tower with std 0.5 (input-dependent greedy output)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "vision_tower" not in name and param.ndim == 2:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)


@pytest.fixture(scope="module")
def checkpoints(tiny_dir, tmp_path_factory) -> dict[str, Path]:
    """aspect ratio → a saved tiny SigLIP + Qwen2 checkpoint with noisy LLM/projector weights."""
    root = tmp_path_factory.mktemp("lmms_ckpt")
    out = {}
    for aspect in ASPECTS:
        cfg = ModelConfig(
            llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "siglip"), image_aspect_ratio=aspect
        )
        torch.manual_seed(1)  # build_model draws the anyres image_newline from the global RNG
        model, tokenizer, processor = build_model(cfg)
        _noisy(model)
        out[aspect] = root / aspect
        save_model(model, tokenizer, processor, out[aspect])
    return out


@pytest.fixture(scope="module")
def adapters(checkpoints) -> dict[str, PivotLlava]:
    return {
        aspect: PivotLlava(pretrained=str(path), device="cpu", batch_size=3, max_new_tokens=5)
        for aspect, path in checkpoints.items()
    }


def _image(size: tuple[int, int], colour: str, seed: int) -> Image.Image:
    """A PIL (width, height) image: noisy background and one coloured disc."""
    rng = np.random.default_rng(seed)
    width, height = size
    image = Image.fromarray(rng.integers(0, 120, (height, width, 3), dtype=np.uint8))
    box = (width // 4, height // 4, 3 * width // 4, 3 * height // 4)
    ImageDraw.Draw(image).ellipse(box, fill=COLOURS[colour])
    return image


def _docs() -> list[dict]:
    return [
        {"question": "What colour is the disc?", "images": [_image((40, 60), "red", 0)]},
        {
            "question": "Is the disc large or small? Answer in one word.",
            "images": [_image((32, 32), "blue", 1)],
        },
        {
            "question": "Which picture is green?",
            "images": [_image((90, 30), "green", 2), _image((30, 50), "red", 3)],
        },
        {"question": "Say a colour.", "images": []},
        {"question": "Where is the disc?", "images": [_image((64, 48), "green", 4)]},
    ]


def _visuals(doc: dict) -> list[Image.Image]:
    return doc["images"]


def _request(kind: str, doc_id: int, doc: dict, second: object) -> Instance:
    args = (doc["question"], second, _visuals, doc_id, TASK, SPLIT)
    return Instance(kind, args, idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


# ---------------------------------------------------------------- independent references


def _reference_prompt(tokenizer, doc: dict, counts: list[int]) -> list[int]:
    """Prompt ids through the training tokenisation: everything before the first supervised label."""
    human = (
        doc["question"]
        if not doc["images"]
        else " ".join(["<image>"] * len(doc["images"])) + "\n" + doc["question"]
    )
    ids, labels = tokenize_conversation([(human, "x")], tokenizer, "qwen_1_5", counts, 4096)
    return ids[: next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)]


def _reference_inputs(adapter: PivotLlava, doc: dict) -> tuple[list[int], dict]:
    model, processor = adapter.model, adapter.image_processor
    counter = image_token_counter(model.config)
    counts = [counter(image.height, image.width) for image in doc["images"]]
    extra = {}
    if doc["images"]:
        processed = processor(images=doc["images"], return_tensors="pt")
        extra["pixel_values"] = processed["pixel_values"]
        if model.config.model_type == "llava_onevision":
            extra["image_sizes"] = torch.tensor([[image.height, image.width] for image in doc["images"]])
    return _reference_prompt(adapter.tokenizer, doc, counts), extra


@torch.no_grad()
def _greedy_reference(adapter: PivotLlava, doc: dict, max_new_tokens: int) -> list[int]:
    """Unbatched greedy decoding with full forwards (no KV cache), stopping at `<|im_end|>`/EOS."""
    ids, extra = _reference_inputs(adapter, doc)
    stop = {adapter.tokenizer.convert_tokens_to_ids("<|im_end|>"), adapter.tokenizer.eos_token_id}
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = adapter.model(input_ids=torch.tensor([ids + new]), use_cache=False, **extra).logits
        token = int(logits[0, -1].argmax())
        new.append(token)
        if token in stop:
            break
    return new


# ---------------------------------------------------------------- prompt construction


def test_human_turn_places_images_like_llava_onevision():
    assert human_turn("Q?", 0) == "Q?"
    assert human_turn("Q?", 1) == "<image>\nQ?"
    assert human_turn("Q?", 2) == "<image> <image>\nQ?"
    assert human_turn("see <image> here", 1) == "see <image> here"
    with pytest.raises(ValueError, match="doc 7: the question holds 1 '<image>' but 2 image"):
        human_turn("see <image>", 2, where="doc 7")


def test_tokenize_prompt_equals_training_tokenisation(adapters):
    adapter = adapters["square"]
    doc = {"question": "How many discs? <|im_end|> tricky", "images": [None, None]}
    counts = [16, 7]
    human = human_turn(doc["question"], 2)
    ids = tokenize_prompt(human, adapter.tokenizer, adapter.template, counts)
    assert ids == _reference_prompt(adapter.tokenizer, doc, counts)
    assert ids.count(adapter.image_id) == 23
    with pytest.raises(ValueError, match="2 '<image>' placeholder"):
        tokenize_prompt(human, adapter.tokenizer, adapter.template, [16])


def test_left_pad_and_cut_at_stops():
    ids = torch.tensor([[5, 6, 7], [8, 0, 0], [1, 2, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]])
    left_ids, left_mask = left_pad(ids, mask, pad_id=0)
    assert left_ids.tolist() == [[5, 6, 7], [0, 0, 8], [0, 1, 2]]
    assert left_mask.tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert cut_at_stops("a b\n\nc", ["\n\n"]) == "a b"
    assert cut_at_stops("xyz.abc", ["c", "."]) == "xyz"
    assert cut_at_stops("xyz", []) == "xyz"
    assert cut_at_stops("xyz", [""]) == "xyz"


def test_entry_point_payload_names_the_adapter():
    manifest = lmms_eval_manifest()
    assert (manifest.model_id, manifest.simple_class_path) == (LMMS_EVAL_MODEL_ID, LMMS_EVAL_CLASS_PATH)
    module, name = LMMS_EVAL_CLASS_PATH.rsplit(".", 1)
    assert getattr(__import__(module, fromlist=[name]), name) is PivotLlava
    assert PivotLlava.is_simple


def _script_tasks() -> list[str]:
    (line,) = [line for line in SCRIPT.read_text().splitlines() if line.startswith("TASKS=")]
    return line.split(":-", 1)[1].rstrip("}").split(",")


def test_script_runs_the_registry_tasks_known_to_lmms_eval():
    tasks = _script_tasks()
    assert tasks == list(dict.fromkeys(spec.task for spec in BENCHMARKS.values()))
    task_dir = Path(importlib.util.find_spec("lmms_eval").origin).parent / "tasks"
    declared = set()
    for path in task_dir.rglob("*.yaml"):
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("task:"):
                declared.add(line.split(":", 1)[1].strip().strip("\"'"))
    assert set(tasks) <= declared, f"not lmms-eval tasks: {sorted(set(tasks) - declared)}"


def test_constructor_rejects_bad_arguments(checkpoints):
    with pytest.raises(ValueError, match="batch_size='auto'"):
        PivotLlava(pretrained=str(checkpoints["square"]), device="cpu", batch_size="auto")
    with pytest.raises(ValueError, match="dtype='int8'"):
        PivotLlava(pretrained=str(checkpoints["square"]), device="cpu", dtype="int8")


# ---------------------------------------------------------------- generation and log-likelihood


@pytest.mark.parametrize("aspect", ASPECTS)
def test_generate_until_equals_unbatched_greedy_reference(adapters, aspect):
    adapter = adapters[aspect]
    docs = _docs()
    adapter.task_dict = {TASK: {SPLIT: docs}}
    tokens = [_greedy_reference(adapter, doc, max_new_tokens=6) for doc in docs]
    references = [adapter.tokenizer.decode(ids, skip_special_tokens=True) for ids in tokens]
    assert len(set(references)) == len(references), f"the noisy model should answer differently: {references}"
    # A stop string taken from inside request 0's answer (so generation really stops there).
    stop = references[0][2:4]
    assert stop.strip(), f"pick another stop string from {references[0]!r}"
    explicit = {"max_new_tokens": 6, "until": [stop]}
    requests = [
        _request("generate_until", i, doc, dict(explicit) if i % 2 == 0 else {"until": "\n\n"})
        for i, doc in enumerate(docs)
    ]
    answers = adapter.generate_until(requests)
    expected = [
        cut_at_stops(references[i], [stop])
        if i % 2
        == 0  # odd requests: no max_new_tokens in the task, so the adapter's max_new_tokens=5 applies
        else cut_at_stops(adapter.tokenizer.decode(tokens[i][:5], skip_special_tokens=True), ["\n\n"])
        for i in range(len(docs))
    ]
    assert answers == expected
    assert len(answers[0]) < len(references[0])


@pytest.mark.parametrize("aspect", ASPECTS)
def test_loglikelihood_equals_plain_forward(adapters, aspect):
    adapter = adapters[aspect]
    docs = _docs()
    adapter.task_dict = {TASK: {SPLIT: docs}}
    tokenizer = adapter.tokenizer
    greedy_ids = _greedy_reference(adapter, docs[0], max_new_tokens=2)
    greedy_text = tokenizer.decode(greedy_ids)
    assert tokenizer.encode(greedy_text, add_special_tokens=False) == greedy_ids, (
        "pick a round-tripping answer"
    )
    cases = [
        (0, greedy_text),
        (0, " a blue disc"),
        (2, " the left one"),
        (3, " red"),
        (4, lambda doc: " top"),
    ]
    requests = [_request("loglikelihood", i, docs[i], target) for i, target in cases]
    scores = adapter.loglikelihood(requests)
    for (i, target), (nll, is_greedy) in zip(cases, scores):
        text = target if isinstance(target, str) else target(docs[i])
        continuation = tokenizer.encode(text, add_special_tokens=False)
        prompt, extra = _reference_inputs(adapter, docs[i])
        with torch.no_grad():
            logits = (
                adapter.model(input_ids=torch.tensor([prompt + continuation]), **extra).logits[0].double()
            )
        positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
        logps = torch.log_softmax(logits[positions], dim=-1)[torch.arange(len(continuation)), continuation]
        assert nll == pytest.approx(-float(logps.sum()), rel=1e-4)
        assert is_greedy == bool((logits[positions].argmax(-1) == torch.tensor(continuation)).all())
    assert [greedy for _, greedy in scores] == [True, False, False, False, False]


# ---------------------------------------------------------------- the real lmms-eval CLI

TASK_YAML = """\
task: {task}
dataset_path: {data}
dataset_kwargs:
  load_from_disk: true
test_split: {split}
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: 4
  until: ["\\n\\n"]
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
  - metric: mmvp_pair_accuracy
    aggregation: !function utils.pair_accuracy
    higher_is_better: true
metadata:
  - version: 0.0
"""

TASK_UTILS = '''\
"""Offline test task: coloured-disc questions; exact match, and MMVP-style pair accuracy."""


def doc_to_visual(doc):
    return [doc["image"].convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    correct = results[0].strip() == doc["answer"]
    return {
        "exact_match": float(correct),
        "mmvp_pair_accuracy": {"index": doc["index"], "is_correct": correct},
    }


def pair_accuracy(items):
    pairs = {}
    for item in items:
        pairs.setdefault(item["index"] // 2, []).append(item["is_correct"])
    return sum(all(flags) for flags in pairs.values()) / len(pairs)
'''

CLI_QUESTIONS = [
    ("What colour is the disc?", (48, 48), "red"),
    ("Is the disc big?", (64, 40), "blue"),
    ("What shape is shown?", (40, 64), "green"),
    ("How many discs are there?", (56, 56), "red"),
    ("Where is the disc?", (32, 48), "blue"),
    ("Describe the picture.", (48, 32), "green"),
]
RIGHT = (0, 1, 2, 4)  # questions whose stored answer is the model's own greedy answer


def _pivot_entry_point_installed() -> bool:
    return any(
        ep.name == LMMS_EVAL_MODEL_ID for ep in importlib.metadata.entry_points(group="lmms_eval.models")
    )


def _write_task(root: Path, answers: list[str]) -> Path:
    from datasets import Dataset, DatasetDict, Features, Value
    from datasets import Image as ImageFeature

    records = {"index": [], "question": [], "image": [], "answer": []}
    for index, ((question, size, colour), answer) in enumerate(zip(CLI_QUESTIONS, answers)):
        records["index"].append(index)
        records["question"].append(question)
        records["image"].append(_image(size, colour, seed=10 + index))
        records["answer"].append(answer)
    features = Features(
        {
            "index": Value("int64"),
            "question": Value("string"),
            "image": ImageFeature(),
            "answer": Value("string"),
        }
    )
    data = root / "data"
    DatasetDict({SPLIT: Dataset.from_dict(records, features=features)}).save_to_disk(str(data))
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(TASK_YAML.format(task=TASK, data=data, split=SPLIT))
    (tasks / "utils.py").write_text(TASK_UTILS)
    return tasks


@pytest.mark.slow
def test_lmms_eval_cli_runs_adapter_and_aggregation_reads_results(checkpoints, tmp_path):
    if not _pivot_entry_point_installed():
        pytest.skip(
            "entry point 'pivot' (group lmms_eval.models) is not installed: setup.py must declare "
            "'pivot = llava.eval:lmms_eval_manifest' and the repo be reinstalled with `pip install -e .`"
        )
    checkpoint = checkpoints["square"]
    adapter = PivotLlava(pretrained=str(checkpoint), device="cpu", batch_size=2)
    docs = [
        {"question": q, "images": [_image(size, colour, seed=10 + i)]}
        for i, (q, size, colour) in enumerate(CLI_QUESTIONS)
    ]
    adapter.task_dict = {TASK: {SPLIT: docs}}
    gen_kwargs = {"max_new_tokens": 4, "until": ["\n\n"]}
    own = [
        answer.strip()
        for answer in adapter.generate_until(
            [_request("generate_until", i, d, dict(gen_kwargs)) for i, d in enumerate(docs)]
        )
    ]
    answers = [own[i] if i in RIGHT else f"not {own[i]}" for i in range(len(docs))]
    tasks = _write_task(tmp_path, answers)

    out = tmp_path / "out"
    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "NUM_GPUS": "0",
        "TASKS": TASK,
        "BATCH_SIZE": "2",
        "OUTPUT_DIR": str(out),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "WANDB_DISABLED": "true",
        "OMP_NUM_THREADS": "1",
    }
    command = ["bash", str(SCRIPT), str(checkpoint), "--include_path", str(tasks)]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    log = f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    results = sorted(out.rglob("*_results.json"))
    assert proc.returncode == 0 and len(results) == 1, (
        log
    )  # lmms-eval itself exits 0 even when evaluation fails
    assert f"{sys.executable} -m lmms_eval --model {LMMS_EVAL_MODEL_ID}" in proc.stdout, log
    table = json.loads((out / "benchmarks.json").read_text())  # the script's own aggregation step ran
    assert table["kind"] == "benchmarks" and len(table["rows"]) == 1
    samples_file = next(results[0].parent.glob(f"*_samples_{TASK}.jsonl"))

    samples = read_samples(samples_file)
    assert sorted(s["doc_id"] for s in samples) == list(range(6))
    accuracy = sum(s["exact_match"] for s in samples) / len(samples)
    assert accuracy == pytest.approx(len(RIGHT) / 6)

    registry = load_registry(
        {
            "RealWorldQA": {"task": TASK, "metric_keys": ["exact_match,none"], "scale": 1},
            "MMVP": {"task": TASK, "metric_keys": ["mmvp_pair_accuracy,none"], "scale": 1},
        }
    )
    (row,) = aggregate([out], registry=registry)
    assert row.scores["RealWorldQA"] == pytest.approx(100 * accuracy)
    assert row.scores["MMVP"] == pytest.approx(100 / 3)  # pairs (0,1) right, (2,3) and (4,5) not
    assert json.loads(results[0].read_text())["results"][TASK]["mmvp_pair_accuracy,none"] == pytest.approx(
        1 / 3
    )
    assert not [w for w in row.warnings if "differs" in w]
    assert set(row.missing) == set(registry) - {"RealWorldQA", "MMVP"}
