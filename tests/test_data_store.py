"""The record store (llava.data.store) gives exactly the items of the list path (issue 17), for .json,
.jsonl, YAML mixtures and data tables (parquet, save_to_disk, dataset-repo directories with configs)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from data_fixtures import tiny_tokenizer, write_image, write_json, write_jsonl
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from llava.data.dataset import MultimodalDataset
from llava.data.errors import DataFileError, RecordError
from llava.data.mixture import load_records_of_their_kind
from llava.data.store import RecordStore, open_record_store

SIZES = [(40, 24), (16, 32), (32, 32), (24, 48)]


def tokens_per_image(height: int, width: int) -> int:
    return (height // 8) * (width // 8)


@pytest.fixture(scope="module")
def processor():
    return SiglipImageProcessorPil(size={"height": 32, "width": 32})


def conversation(index: int) -> dict:
    raw = {
        "image": f"images/{index % len(SIZES)}.png",
        "conversations": [
            {"from": "human", "value": f"Question {index}?"},
            {"from": "gpt", "value": "word " * (1 + index % 7)},
        ],
    }
    return raw if index % 3 else {"id": f"r{index}", **raw}


def preference(index: int) -> dict:
    return {
        "id": f"p{index}",
        "image": f"images/{index % len(SIZES)}.png",
        "prompt": f"<image>\nWhat is {index}?",
        "chosen": "yes " * (1 + index % 5),
        "rejected": "no " * (1 + index % 4),
        "meta": {"n": index},
    }


@pytest.fixture
def world(tmp_path):
    for index, size in enumerate(SIZES):
        write_image(
            tmp_path / "images" / f"{index}.png", size=size, colour=(40 * index, 90, 200 - 40 * index)
        )
    alpha = [conversation(i) for i in range(12)]
    alpha[5] = {"id": "broken", "conversations": [{"from": "human", "value": "no reply"}]}  # fails parsing
    alpha[7]["image"] = "images/missing.png"  # fails validation
    write_json(tmp_path / "data" / "alpha.json", alpha)
    write_jsonl(tmp_path / "data" / "beta.jsonl", [conversation(100 + i) for i in range(9)])
    write_json(tmp_path / "data" / "dpo.json", [preference(i) for i in range(10)])
    (tmp_path / "mix.yaml").write_text(
        "datasets:\n"
        "  - json_path: data/alpha.json\n    sampling_strategy: random:75%\n"
        "  - json_path: data/beta.jsonl\n    sampling_strategy: end:4\n"
        "  - json_path: data/alpha.json\n    sampling_strategy: first:3\n"
    )
    return tmp_path


def both_datasets(
    data_path, world, processor, cache, **kwargs
) -> tuple[MultimodalDataset, MultimodalDataset]:
    errors: list[RecordError] = []
    kind, records = load_records_of_their_kind(data_path, str(world), seed=3, errors=errors)
    store = open_record_store(data_path, str(world), cache, seed=3)
    assert store.kind == kind
    assert [str(e) for e in store.parse_errors()] == [str(e) for e in errors]
    assert [type(e) for e in store.parse_errors()] == [type(e) for e in errors]
    args = (tiny_tokenizer(), processor, "qwen_1_5", tokens_per_image, 2048)
    return MultimodalDataset(records, *args, **kwargs), MultimodalDataset(store, *args, **kwargs)


def assert_same_items(old: MultimodalDataset, new: MultimodalDataset) -> None:
    assert new.ids == old.ids and len(new) == len(old)
    assert [new.records[i] for i in range(len(new))] == list(old.records)
    for index in range(len(old)):
        try:
            expected = old[index]
        except RecordError as error:
            with pytest.raises(type(error), match="not found"):
                new[index]
            continue
        got = new[index]
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            if isinstance(value, torch.Tensor):
                torch.testing.assert_close(got[key], value, rtol=0, atol=0)
            else:
                assert got[key] == value


@pytest.mark.parametrize("name", ["data/alpha.json", "data/beta.jsonl", "mix.yaml", "data/dpo.json"])
def test_store_gives_the_items_of_the_list_path(world, processor, tmp_path, name):
    old, new = both_datasets(str(world / name), world, processor, tmp_path / "cache")
    assert isinstance(new.records, RecordStore) and new.records.built
    assert len(old) > 0
    assert_same_items(old, new)
    assert [(p, str(e)) for p, e in new.invalid_records()] == [(p, str(e)) for p, e in old.invalid_records()]
    keep = list(range(0, len(old), 2))[::-1]
    old.keep(keep)
    new.keep(keep)
    assert_same_items(old, new)


def test_store_is_reused_and_rebuilt_when_an_input_changes(world, tmp_path):
    cache = tmp_path / "cache"
    path = str(world / "mix.yaml")
    first = open_record_store(path, str(world), cache, seed=3)
    again = open_record_store(path, str(world), cache, seed=3)
    assert first.built and not again.built and again.directory == first.directory
    assert open_record_store(path, str(world), cache, seed=3, kind="conversation").built  # kind is keyed
    other_seed = open_record_store(path, str(world), cache, seed=4)  # the mixture samples random:N
    assert other_seed.built and other_seed.ids != first.ids
    assert open_record_store(path, str(world / "images"), cache, seed=3).built  # image folder
    beta = world / "data" / "beta.jsonl"
    beta.write_text(beta.read_text() + json.dumps(conversation(999)) + "\n")
    changed = open_record_store(path, str(world), cache, seed=3)
    assert changed.built and changed.directory != first.directory
    os.utime(beta, ns=(1, 1))
    assert open_record_store(path, str(world), cache, seed=3).built  # mtime alone counts
    json_path = str(world / "data" / "dpo.json")
    open_record_store(json_path, str(world), cache)
    assert not open_record_store(json_path, str(world), cache, seed=99).built  # no random: seed unkeyed


def test_a_process_that_must_not_build_says_where_it_looked(world, tmp_path):
    with pytest.raises(DataFileError, match="record store .* not found; the main process builds it"):
        open_record_store(str(world / "data" / "dpo.json"), str(world), tmp_path / "cache", build=False)
