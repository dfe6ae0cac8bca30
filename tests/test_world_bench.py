"""The miniature's benchmark suite (llava/data/world_bench.py) and its scoring through the real path.

- The writer: held-out (val) questions of every type, answers inside the answer set, the target among
  the forced-choice candidates, same seed same questions, task names equal to the world registry's;
  answers balanced per type (no answer more common than the runner-up), bench.json's counts truthful.
- Scoring functions: answer parsing of free text, forced choice = lowest NLL (both result forms).
- The real CLI (slow): `scripts/eval/cambrian16.sh` with `--model pivot`, `SUITE=world` and the written
  tasks via `--include_path`; the forced-choice score in benchmarks.json equals the per-sample argmin
  recomputed from the adapter's own in-process `loglikelihood`, and the greedy score equals
  `parse_answer` applied to the adapter's own in-process greedy answers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from analysis.benchmarks import WORLD_BENCHMARKS, load_registry
from llava.data.synthetic import Question, generate_world
from llava.data.world_bench import (
    CATEGORY_OF,
    MODES,
    answer_set,
    balance_answers,
    benchmark_questions,
    candidate_statement,
    parse_answer,
    process_choice,
    process_generation,
    task_name,
    write_world_bench,
)

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval" / "cambrian16.sh"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench_world") / "world"
    generate_world(root, seed=3, num_train=4, num_val=12, image_size=32)
    return root


@pytest.fixture(scope="module")
def bench(world, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    return out, write_world_bench(world, out, per_type=5, max_new_tokens=6)


def test_writer_asks_held_out_questions_with_answers_among_candidates(world, bench):
    out, summary = bench
    questions = benchmark_questions(world)
    assert set(questions) == set(CATEGORY_OF)
    assert questions == benchmark_questions(world), "same world and seed, same questions"
    assert questions != benchmark_questions(world, seed=1)
    for question_type, records in questions.items():
        assert records, question_type
        for record in records:
            assert record["image"].startswith("images/val/") and (world / record["image"]).is_file()
            assert record["answer"] in record["values"] == answer_set(question_type, 4)
            assert record["target"] in record["choices"] and len(record["choices"]) == len(record["values"])
    names = {task_name(t, m) for t in CATEGORY_OF for m in MODES}
    assert set(summary["tasks"]) == names == {spec.task for spec in WORLD_BENCHMARKS.values()}
    assert {p.stem for p in (out / "tasks").glob("*.yaml")} == names
    for name, task in summary["tasks"].items():
        spec = next(s for s in WORLD_BENCHMARKS.values() if s.task == name)
        assert spec.category == task["category"] and 0 < task["chance"] <= task["majority"] <= 1
        balanced = balance_answers(questions[task["question_type"]])
        assert task["feasible"] == len(questions[task["question_type"]])
        assert task["dropped_by_balancing"] == task["feasible"] - len(balanced)
        assert task["questions"] == min(5, len(balanced)) == sum(task["answers"].values())
        assert task["majority"] == max(task["answers"].values()) / task["questions"]
        assert "hub" not in (out / "tasks" / f"{name}.yaml").read_text()
    assert load_registry(suite="world") == WORLD_BENCHMARKS
    with pytest.raises(ValueError, match="unknown benchmark suite 'x'"):
        load_registry(suite="x")


def test_balancing_gives_no_answer_more_questions_than_the_runner_up(world):
    def records(answers: str) -> list[dict]:
        return [{"id": i, "answer": a, "values": ["a", "b", "c", "d"]} for i, a in enumerate(answers)]

    balanced = balance_answers(records("aaaabacaba"))  # a: 7, b: 2, c: 1
    assert [r["answer"] for r in balanced] == ["a", "b", "c", "a", "b"]
    assert [r["id"] for r in balanced] == [0, 4, 6, 1, 8], "each answer's records keep their order"
    assert balance_answers(records("aaa")) == records("aaa"), "a single answer cannot be balanced"
    assert balance_answers([]) == []
    for question_type, questions in benchmark_questions(world).items():
        balanced = balance_answers(questions)
        assert balanced == balance_answers(questions), "deterministic"
        assert {r["id"] for r in balanced} <= {r["id"] for r in questions}
        total = Counter(r["answer"] for r in balanced)
        counts = sorted(total.values())
        assert len(counts) == 1 or counts[-1] == counts[-2], (question_type, counts)
        for n in range(1, len(balanced) + 1):  # every prefix: an answer leads another by at most one
            prefix = Counter(r["answer"] for r in balanced[:n])  # unless the other has run out
            assert all(prefix[v] - prefix[w] <= 1 or prefix[w] == total[w] for v in total for w in total)


def test_candidates_are_stage1_statements_differing_only_in_the_answer():
    def question(kind: str, text: str, answer: str, statement: str) -> Question:
        return Question(kind, text, answer, "", "", "", statement, (0,))

    colour = question("colour", "What colour is the star?", "red", "The star is red.")
    assert [candidate_statement(colour, v) for v in ("red", "blue")] == [
        "The star is red.",
        "The star is blue.",
    ]
    shape = question("shape", "What shape is the red object?", "star", "The red object is a star.")
    assert candidate_statement(shape, "circle") == "The red object is a circle."
    assert candidate_statement(shape, "diamond") == "The red object is a diamond."
    count = question("count", "How many objects are there in the image?", "1", "There is 1 object.")
    assert candidate_statement(count, "1") == count.statement
    assert candidate_statement(count, "3") == "There are 3 objects."
    text = "Is the red star to the left of the blue circle?"
    left = question("position", text, "no", "No, the red star is to the right of the blue circle.")
    assert candidate_statement(left, "yes") == "Yes, the red star is to the left of the blue circle."
    with pytest.raises(ValueError, match="does not match its template"):
        candidate_statement(question("count", "How many crosses are there in the image?", "1", ""), "1")
    with pytest.raises(ValueError, match="does not match its template"):
        candidate_statement(question("colour", "Which colour?", "red", ""), "red")


def test_parse_answer_reads_the_stated_value():
    colours = answer_set("colour", 4)
    assert parse_answer("Red.", colours) == "red"
    assert parse_answer("The circle is blue.", colours) == "blue"
    assert parse_answer("The red one hides it. So the answer is green.", colours) == "green"
    assert parse_answer("I cannot tell.", colours) is None
    assert parse_answer("There are 3 stars.", answer_set("count", 4)) == "3"
    assert parse_answer("No, the star is to the right.", ["yes", "no"]) == "no"
    doc = {"values": colours, "answer": "red"}
    assert process_generation(doc, ["Red."]) == {"exact_match": 1.0}
    assert process_generation(doc, ["Blue."]) == {"exact_match": 0.0}


def test_forced_choice_picks_the_lowest_nll_in_either_result_form():
    doc = {"id": "q", "choices": ["Red.", "Blue.", "Green."], "target": "Blue."}
    assert process_choice(doc, [(3.0, False), (1.0, True), (2.0, False)]) == {"acc": 1.0}
    assert process_choice(doc, ["(3.0, False)", "(4.0, False)", "(2.5, False)"]) == {"acc": 0.0}
    with pytest.raises(ValueError, match="world question q: 2 loglikelihood results for 3 choices"):
        process_choice(doc, [(1.0, False), (2.0, False)])
    with pytest.raises(ValueError, match="world question q: expected an"):
        process_choice(doc, ["oops", "(1.0, False)", "(2.0, False)"])


@pytest.mark.slow
def test_cli_scores_equal_the_adapters_own_answers(tiny_dir, bench, tmp_path):
    from datasets import load_from_disk
    from lmms_eval.api.instance import Instance

    from llava.eval.lmms_adapter import PivotLlava
    from llava.model.builder import ModelConfig, build_model, save_model

    out, _ = bench
    torch.manual_seed(0)
    model, tokenizer, processor = build_model(
        ModelConfig(llm=str(tiny_dir / "llm"), vision_tower=str(tiny_dir / "siglip"))
    )
    with torch.no_grad():  # input-dependent answers (the stock tiny init answers the same to everything)
        for name, param in model.named_parameters():
            if "vision_tower" not in name and param.ndim == 2:
                param.copy_(torch.randn(param.shape) * 0.5)
    checkpoint = tmp_path / "ckpt"
    save_model(model, tokenizer, processor, checkpoint)

    adapter = PivotLlava(pretrained=str(checkpoint), device="cpu", batch_size=4)
    docs = list(load_from_disk(str(out / "data" / "colour"))["test"])
    adapter.task_dict = {"t": {"test": docs}}
    from llava.data.world_bench import doc_to_visual

    def request(kind: str, doc_id: int, second: object) -> Instance:
        args = (docs[doc_id]["question"], second, doc_to_visual, doc_id, "t", "test")
        return Instance(kind, args, idx=0, metadata={"task": "t", "doc_id": doc_id, "repeats": 1})

    choice = []
    for i, doc in enumerate(docs):
        nlls = adapter.loglikelihood([request("loglikelihood", i, c) for c in doc["choices"]])
        choice.append(process_choice(doc, nlls)["acc"])
    answers = adapter.generate_until(
        [
            request("generate_until", i, {"max_new_tokens": 6, "until": ["<|im_end|>"]})
            for i in range(len(docs))
        ]
    )
    greedy = [process_generation(doc, [a.strip()])["exact_match"] for doc, a in zip(docs, answers)]

    env = {
        **os.environ,
        "PYTHON": sys.executable,
        "NUM_GPUS": "0",
        "SUITE": "world",
        "TASKS": "world_colour_choice,world_colour_gen",
        "BATCH_SIZE": "4",
        "OUTPUT_DIR": str(tmp_path / "eval"),
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = ["bash", str(SCRIPT), str(checkpoint), "--include_path", str(out / "tasks")]
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    table = tmp_path / "eval" / "benchmarks.json"
    assert proc.returncode == 0 and table.is_file(), proc.stdout[-3000:] + proc.stderr[-3000:]
    (row,) = json.loads(table.read_text())["rows"]
    assert row["Colour (forced choice)"] == pytest.approx(100 * sum(choice) / len(choice))
    assert row["Colour (greedy)"] == pytest.approx(100 * sum(greedy) / len(greedy))
    assert row["General"] == pytest.approx((row["Colour (forced choice)"] + row["Colour (greedy)"]) / 2)
    assert "Count (greedy)" in row["missing"]


def test_run_many_rejects_bad_checkpoint_lists(tmp_path, capsys):
    from llava.eval.run_many import main as run_many

    (tmp_path / "ckpt").mkdir()
    good = f"a={tmp_path}/ckpt"
    for argv, message in (
        ([f"a{tmp_path}"], "expected NAME=CHECKPOINT"),
        ([f"a={tmp_path}/x,y"], "cannot carry a comma"),
        ([good], "not a checkpoint directory"),
    ):
        with pytest.raises(SystemExit):
            run_many([*argv, "--output_root", str(tmp_path / "out")])
        assert message in capsys.readouterr().err
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        run_many([good, good, "--output_root", str(tmp_path / "out")])
    assert "names must be unique" in capsys.readouterr().err


def test_run_many_local_tasks_only_indexes_only_the_include_path(tmp_path, capsys):
    from lmms_eval.tasks import TaskManager

    from llava.eval.run_many import local_tasks_only
    from llava.eval.run_many import main as run_many

    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "mine.yaml").write_text("task: mine_only\ndataset_path: x\noutput_type: generate_until\n")
    import lmms_eval.__main__ as cli

    with local_tasks_only():
        indexed = cli.TaskManager("WARNING", include_path=str(tasks)).all_tasks
    assert indexed == ["mine_only"]
    assert cli.TaskManager is TaskManager  # restored after the block
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_text("{}")
    with pytest.raises(SystemExit):
        run_many(
            [
                f"a={tmp_path}/ckpt",
                "--output_root",
                str(tmp_path / "out"),
                "--local_tasks_only",
                "--",
                "--tasks",
                "x",
            ]
        )
    assert "needs lmms-eval's --include_path" in capsys.readouterr().err
