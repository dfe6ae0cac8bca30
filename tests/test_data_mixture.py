"""`load_records`: .json / .jsonl files and YAML mixtures with all / first / end / random sampling."""

from __future__ import annotations

import math
import os

import pytest
from data_fixtures import write_json, write_jsonl

from llava.data.errors import DataFileError, EmptyResponseError
from llava.data.mixture import load_records, load_records_of_their_kind, refuse_duplicate_ids
from llava.data.records import ConversationRecord, PreferenceRecord


def qa(index: int) -> dict:
    return {
        "image": f"images/{index}.png",
        "conversations": [{"from": "human", "value": f"Q{index}"}, {"from": "gpt", "value": f"A{index}"}],
    }


@pytest.fixture
def world(tmp_path):
    """Two record files (20 and 10 records, no ids) under <tmp>/data and a mixture writer."""
    write_json(tmp_path / "data" / "alpha.json", [qa(i) for i in range(20)])
    write_jsonl(tmp_path / "data" / "beta.jsonl", [qa(100 + i) for i in range(10)])
    return tmp_path


def write_mixture(path, *entries: tuple[str, str]) -> str:
    lines = ["datasets:"] + [f"  - json_path: {p}\n    sampling_strategy: {s}" for p, s in entries]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def answers(records) -> list[str]:
    return [record.turns[0][1] for record in records]


def test_json_and_jsonl_files(world):
    records = load_records(str(world / "data" / "alpha.json"), str(world), "conversation")
    assert len(records) == 20 and all(isinstance(r, ConversationRecord) for r in records)
    assert records[3].id == "alpha:3" and records[3].images == [os.path.join(str(world), "images/3.png")]
    (world / "data" / "beta.jsonl").write_text(
        (world / "data" / "beta.jsonl").read_text() + "\n\n", encoding="utf-8"
    )  # trailing blank lines are fine
    records = load_records(str(world / "data" / "beta.jsonl"), None, "conversation")
    assert answers(records) == [f"A{100 + i}" for i in range(10)]
    assert records[0].id == "beta:0" and records[0].images == ["images/100.png"]


def test_mixture_strategies(world):
    path = write_mixture(world / "mix.yaml", ("data/alpha.json", "first:3"), ("data/beta.jsonl", "end:2"))
    records = load_records(path, str(world), "conversation")
    assert answers(records) == ["A0", "A1", "A2", "A108", "A109"]
    assert [r.id for r in records] == [
        "alpha:0",
        "alpha:1",
        "alpha:2",
        "beta:8",
        "beta:9",
    ]  # ids from file position
    assert records[0].source == str(world / "data" / "alpha.json")
    path = write_mixture(world / "all.yaml", ("data/alpha.json", "all"), ("data/beta.jsonl", "all"))
    assert len(load_records(path, str(world), "conversation")) == 30


def test_percentages_round_up(world):
    path = write_mixture(world / "pct.yaml", ("data/alpha.json", "first:25%"), ("data/beta.jsonl", "end:15%"))
    records = load_records(path, None, "conversation")
    assert len(records) == math.ceil(0.25 * 20) + math.ceil(0.15 * 10) == 7
    assert answers(records)[-2:] == ["A108", "A109"]


def test_random_sampling_uses_the_seed(world):
    path = write_mixture(
        world / "rnd.yaml", ("data/alpha.json", "random:5"), ("data/beta.jsonl", "random:50%")
    )
    first = load_records(path, None, "conversation", seed=0)
    again = load_records(path, None, "conversation", seed=0)
    other = load_records(path, None, "conversation", seed=1)
    assert [r.id for r in first] == [r.id for r in again]
    assert [r.id for r in first] != [r.id for r in other]
    for records in (first, other):
        alpha, beta = records[:5], records[5:]
        indices = [int(r.id.split(":")[1]) for r in alpha]
        assert len(set(indices)) == 5 and indices == sorted(indices)  # distinct, kept in file order
        assert len(beta) == 5 and all(r.id.startswith("beta:") for r in beta)
        assert all(r.turns[0][1] == f"A{int(r.id.split(':')[1])}" for r in alpha)


def test_mixture_paths_relative_to_yaml(world, monkeypatch, tmp_path_factory):
    path = write_mixture(world / "mix.yaml", ("data/alpha.json", "first:1"))
    monkeypatch.chdir(tmp_path_factory.mktemp("elsewhere"))
    assert answers(load_records(path, None, "conversation")) == ["A0"]
    absolute = write_mixture(world / "abs.yaml", (str(world / "data" / "beta.jsonl"), "first:1"))
    assert answers(load_records(absolute, None, "conversation")) == ["A100"]


def test_mixture_paths_fall_back_to_the_working_directory(world, monkeypatch, tmp_path_factory):
    """LLaVA-NeXT / PIVOT mixtures (e.g. PIVOT's single_image.yaml) name json paths relative to the cwd."""
    elsewhere = tmp_path_factory.mktemp("yaml_dir")
    path = write_mixture(elsewhere / "mix.yaml", ("data/alpha.json", "first:2"), ("data/beta.jsonl", "end:1"))
    monkeypatch.chdir(world)
    assert answers(load_records(path, None, "conversation")) == ["A0", "A1", "A109"]


def test_mixture_paths_prefer_the_yaml_directory(world, monkeypatch, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    write_json(cwd / "data" / "alpha.json", [qa(500)])
    monkeypatch.chdir(cwd)
    path = write_mixture(world / "mix.yaml", ("data/alpha.json", "first:1"))
    assert answers(load_records(path, None, "conversation")) == ["A0"]


def test_missing_mixture_path_names_both_paths_tried(world, monkeypatch, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("cwd")
    monkeypatch.chdir(cwd)
    missing = write_mixture(world / "missing.yaml", ("data/alpha.json", "all"), ("data/gamma.json", "all"))
    with pytest.raises(DataFileError, match="datasets\\[1\\].json_path 'data/gamma.json' not found") as info:
        load_records(missing, None, "conversation")
    assert info.value.path == missing
    assert str(world / "data" / "gamma.json") in str(info.value)
    assert str(cwd / "data" / "gamma.json") in str(info.value)


def _pairs(n: int) -> list[dict]:
    return [{"id": f"p{i}", "prompt": "Q", "chosen": "A", "rejected": "B"} for i in range(n)]


def _conversations(n: int) -> list[dict]:
    return [
        {"id": f"c{i}", "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}
        for i in range(n)
    ]


def test_kind_is_each_files_majority_and_a_bad_first_record_is_reported(tmp_path):
    raw = _pairs(4)
    del raw[0]["chosen"]
    errors = []
    kind, records = load_records_of_their_kind(
        str(write_jsonl(tmp_path / "dpo.jsonl", raw)), None, errors=errors
    )
    assert kind == "preference" and [r.id for r in records] == ["p1", "p2", "p3"]
    assert [e.record_id for e in errors] == ["p0"] and "chosen" in errors[0].reason
    kind, _ = load_records_of_their_kind(str(write_jsonl(tmp_path / "sft.jsonl", _conversations(2))), None)
    assert kind == "conversation"


def test_kind_refuses_an_even_split_and_a_mixture_of_kinds(tmp_path):
    split = write_jsonl(tmp_path / "split.jsonl", _pairs(2) + _conversations(2))
    with pytest.raises(DataFileError, match=r"equal numbers \(2 preference, 2 conversation") as info:
        load_records_of_their_kind(str(split), None)
    assert info.value.path == str(split)
    write_jsonl(tmp_path / "dpo.jsonl", _pairs(3))
    write_jsonl(tmp_path / "sft.jsonl", _conversations(3))
    mixture = write_mixture(tmp_path / "mix.yaml", ("dpo.jsonl", "all"), ("sft.jsonl", "all"))
    with pytest.raises(DataFileError, match="holds conversation records, but .*dpo.jsonl holds preference"):
        load_records_of_their_kind(mixture, None)


def test_preference_kind(tmp_path):
    raw = [{"id": f"p{i}", "prompt": "Q", "chosen": "A", "rejected": "B"} for i in range(3)]
    records = load_records(str(write_jsonl(tmp_path / "dpo.jsonl", raw)), None, "preference")
    assert [r.id for r in records] == ["p0", "p1", "p2"] and all(
        isinstance(r, PreferenceRecord) for r in records
    )


@pytest.mark.parametrize(
    ("yaml_text", "message"),
    [
        ("datasets: [unclosed", "invalid YAML"),
        ("datasets: []", "non-empty list 'datasets'"),
        ("datasets:\n  - sampling_strategy: all", "string 'json_path'"),
        (
            "datasets:\n  - json_path: data/alpha.json\n    sampling_strategy: middle:3",
            "unknown sampling_strategy",
        ),
        ("datasets:\n  - json_path: data/alpha.json\n    sampling_strategy: first", "needs an amount"),
        ("datasets:\n  - json_path: data/alpha.json\n    sampling_strategy: first:x", "needs an amount"),
        ("datasets:\n  - json_path: data/alpha.json\n    sampling_strategy: first:0", "count must be >= 1"),
        ("datasets:\n  - json_path: data/alpha.json\n    sampling_strategy: random:150%", "percentage"),
        ("datasets:\n  - json_path: data/alpha.json\n    sampling_strategy: all:3", "takes no amount"),
        ("datasets:\n  - json_path: data/alpha.json\n    weight: 2", "unknown keys"),
    ],
)
def test_bad_mixture_names_the_yaml(world, yaml_text, message):
    path = world / "bad.yaml"
    path.write_text(yaml_text + "\n", encoding="utf-8")
    with pytest.raises(DataFileError, match=message) as info:
        load_records(str(path), None, "conversation")
    assert info.value.path == str(path) and str(path) in str(info.value)


def test_bad_data_files_are_named(world):
    alpha = str(world / "data" / "alpha.json")
    too_many = write_mixture(world / "many.yaml", ("data/alpha.json", "random:21"))
    with pytest.raises(DataFileError, match="more records than the file holds \\(20\\)") as info:
        load_records(too_many, None, "conversation")
    assert info.value.path == alpha
    gamma = str(world / "data" / "gamma.json")
    with pytest.raises(DataFileError, match="not found") as info:
        load_records(write_mixture(world / "missing.yaml", (gamma, "all")), None, "conversation")
    assert info.value.path == gamma
    (world / "obj.json").write_text('{"id": 1}', encoding="utf-8")
    with pytest.raises(DataFileError, match="list of records"):
        load_records(str(world / "obj.json"), None, "conversation")
    (world / "broken.jsonl").write_text('{"id": 1}\n{oops\n', encoding="utf-8")
    with pytest.raises(DataFileError, match="line 2: invalid JSON"):
        load_records(str(world / "broken.jsonl"), None, "conversation")
    (world / "data.csv").write_text("a,b\n", encoding="utf-8")
    with pytest.raises(DataFileError, match="unsupported record file type"):
        load_records(str(world / "data.csv"), None, "conversation")
    with pytest.raises(ValueError, match="unknown record kind"):
        load_records(alpha, None, "sft")


def test_bad_record_inside_mixture_names_file_and_id(world):
    records = [qa(i) for i in range(3)]
    records[2]["conversations"][1]["value"] = ""
    write_json(world / "data" / "bad.json", records)
    path = write_mixture(world / "mix.yaml", ("data/bad.json", "end:1"))
    with pytest.raises(EmptyResponseError) as info:
        load_records(path, None, "conversation")
    assert info.value.path == str(world / "data" / "bad.json") and info.value.record_id == "bad:2"


def test_duplicate_ids_are_refused_naming_the_ids_and_files(world):
    # Before: SFT data with repeated ids only warned, and sample_order.jsonl no longer identified samples.
    records = [{**qa(i), "id": f"q{i % 3}"} for i in range(4)]
    write_json(world / "data" / "dup.json", records)
    path = str(world / "data" / "dup.json")
    with pytest.raises(
        DataFileError, match="1 sample id\\(s\\) occur more than once \\('q0' x2 in .*dup.json\\)"
    ):
        refuse_duplicate_ids(load_records(path, str(world), "conversation"), path)
    write_json(world / "data" / "gamma.json", [{**qa(i), "id": f"g{i}"} for i in range(3)])
    mixture = write_mixture(world / "twice.yaml", ("data/gamma.json", "all"), ("data/gamma.json", "first:1"))
    with pytest.raises(DataFileError, match=f"{mixture}: .*'g0' x2 in .*gamma.json"):
        refuse_duplicate_ids(load_records(mixture, str(world), "conversation"), mixture)
