"""GRPO ground truth (issue 16): prompt records with `answer`, the MMPR converter's derivation of it
(llava.data.mmpr_answers) and its GRPO json, and the synthetic world's answer for every question."""

from __future__ import annotations

import json

import pytest

from llava.data.errors import MalformedRecordError, MissingKeyError
from llava.data.mixture import load_records_of_their_kind
from llava.data.mmpr_answers import derive_answer, grpo_records
from llava.data.mmpr_input import MMPRItem
from llava.data.records import PromptRecord, parse_prompt_record

MC_QUESTION = "<image>\nWhich shape is red?\nA. circle\nB. square\nC. star\nAnswer with the letter."


def _item(chosen: str, question: str = "<image>\nHow many stars?", line: int = 1, **extra) -> MMPRItem:
    return MMPRItem("ds", line, "ds.jsonl", ("img.png",), question, chosen, "wrong", extra)


@pytest.mark.parametrize(
    ("chosen", "question", "expected"),
    [
        ("Looking at the options, the answer is B.", MC_QUESTION, ("B", "multiple_choice")),
        ("(C)", MC_QUESTION, ("C", "multiple_choice")),
        ("I count them one by one. The answer is 12.", "<image>\nHow many stars?", ("12", "number")),
        ("The total is \\boxed{3.5}", "<image>\nWhat is the length?", ("3.5", "number")),
        ("Red.", "<image>\nWhat colour is it?", ("Red.", "short")),
        ("So the answer is dark blue.", "<image>\nWhat colour is it?", ("dark blue", "short")),
        # "A" is only a choice letter when the question lists lettered options.
        ("A", "<image>\nName the first letter on the sign.", ("A", "short")),
    ],
)
def test_answer_is_derived_from_the_chosen_response(chosen, question, expected):
    assert derive_answer(_item(chosen, question)) == expected


@pytest.mark.parametrize(
    ("chosen", "reason"),
    [
        ("The image shows a red circle on a blue background next to a small green square.", "free-form"),
        (
            "After looking closely, the answer is a red circle that sits on the left of a big square.",
            "not a letter",
        ),
    ],
)
def test_free_form_answers_are_not_derived(chosen, reason):
    derived = derive_answer(_item(chosen))
    assert isinstance(derived, str) and reason in derived


def test_an_annotated_answer_wins_and_keeps_its_format():
    item = _item(
        "A long explanation without a final statement at all, many words.", answer=3, answer_format="number"
    )
    assert derive_answer(item) == ("3", "number")
    assert "answer_format" in derive_answer(_item("Red.", answer="red", answer_format="colour"))


def test_grpo_records_list_the_items_without_an_answer():
    items = [
        _item("The answer is 4.", line=1),
        _item("A picture of many things in a field under a bright blue sky today.", line=2),
        _item("(B)", MC_QUESTION, line=3, box=[1, 2, 3, 4]),
    ]
    records, report = grpo_records(items)
    assert [r["id"] for r in records] == ["ds/1", "ds/3"]
    assert records[1]["box"] == [1, 2, 3, 4] and records[1]["answer"] == "B"
    assert report["written"] == 2 and report["no_answer"] == 1
    assert report["by_format"] == {"number": 1, "multiple_choice": 1}
    assert [row["id"] for row in report["no_answer_items"]] == ["ds/2"]
    parsed = [parse_prompt_record(r, "grpo.json", i) for i, r in enumerate(records)]
    assert parsed[0].reward_fields()["answer"] == "4"


def test_prompt_record_validation_names_the_record():
    good = {"id": "r1", "prompt": "How many?", "answer": 3, "answer_format": "number"}
    record = parse_prompt_record(good, "g.json", 0)
    assert isinstance(record, PromptRecord) and record.answer == "3"
    with pytest.raises(MissingKeyError, match=r"g.json.*r2.*missing key 'answer'"):
        parse_prompt_record({"id": "r2", "prompt": "Q"}, "g.json", 1)
    with pytest.raises(MalformedRecordError, match="answer_format"):
        parse_prompt_record({**good, "answer_format": "colour"}, "g.json", 0)
    with pytest.raises(MalformedRecordError, match="box"):
        parse_prompt_record({**good, "box": [1, 2]}, "g.json", 0)


def test_prompt_files_are_their_own_kind(tmp_path):
    rows = [{"id": f"p{i}", "prompt": "Q", "answer": "a"} for i in range(3)] + [{"id": "bad", "prompt": "Q"}]
    path = tmp_path / "grpo.json"
    path.write_text(json.dumps(rows))
    errors = []
    kind, records = load_records_of_their_kind(str(path), None, errors=errors)
    assert kind == "prompt" and [r.id for r in records] == ["p0", "p1", "p2"]
    assert [e.record_id for e in errors] == ["bad"]


def test_converter_writes_a_grpo_json_sharing_ids_with_dpo(tmp_path):
    from llava.data.mmpr import MMPRConfig, convert_mmpr, write_conversion
    from llava.data.synthetic import generate_world

    world = tmp_path / "world"
    generate_world(world, seed=0, num_train=4, num_val=1, image_size=32)
    conversion = convert_mmpr(
        MMPRConfig(
            meta_path=str(world / "mmpr" / "meta.json"),
            size=8,
            token_limit=0,
            model_max_length=0,
            image_folder=str(world),
            allow_fewer=True,
        )
    )
    paths = write_conversion(conversion, tmp_path / "out" / "dpo.json", tmp_path / "out" / "sft.json")
    grpo = json.loads(paths["grpo"].read_text())
    dpo = json.loads(paths["dpo"].read_text())
    assert [r["id"] for r in grpo] == [r["id"] for r in dpo], "the world has an answer for every question"
    report = json.loads(paths["report"].read_text())["grpo"]
    assert report["written"] == len(dpo) and report["no_answer"] == 0
    for record, pair in zip(grpo, dpo):
        assert record["prompt"] == pair["prompt"] and record.get("image") == pair.get("image")
        assert record["answer"] == pair["meta"]["answer"]
        assert record["answer"].lower() in pair["chosen"].lower(), "the chosen reply states the answer"
