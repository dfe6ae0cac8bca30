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
from llava.data.mixture import load_records_of_their_kind, refuse_duplicate_ids
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


def prompt(index: int) -> dict:
    """A GRPO prompt record (llava.data.records.PromptRecord)."""
    return {
        "id": f"g{index}",
        "image": f"images/{index % len(SIZES)}.png",
        "prompt": f"<image>\nHow many dots are there, {index}?",
        "answer": str(index % 4),
        "answer_format": "number",
        "meta": {"n": index},
        "box": [0.0, 1.0, 2.0, 3.5] if index % 2 else None,  # every row has the key: a table's columns
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
    write_json(tmp_path / "data" / "grpo.json", [prompt(i) for i in range(10)])
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


@pytest.mark.parametrize(
    "name", ["data/alpha.json", "data/beta.jsonl", "mix.yaml", "data/dpo.json", "data/grpo.json"]
)
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


# ---- data tables: parquet, save_to_disk, dataset-repo directories, mixed with JSON ------------------
def table_of(raw_records: list[dict], world, embed: bool):
    """A `datasets.Dataset` of the records, their images embedded as an Image feature (or kept as paths)."""
    from datasets import Dataset, Image

    rows = [dict(r) for r in raw_records]
    if embed:
        for row in rows:
            row["image"] = {"bytes": (world / row["image"]).read_bytes(), "path": row["image"]}
    table = Dataset.from_list(rows)
    return table.cast_column("image", Image()) if embed else table


def items_of(dataset: MultimodalDataset) -> list[dict]:
    return [dataset[i] for i in range(len(dataset))]


def assert_items_equal(a: list[dict], b: list[dict]) -> None:
    assert [x["id"] for x in a] == [y["id"] for y in b] and len(a) > 0
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for key in x:
            if isinstance(x[key], torch.Tensor):
                torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)
            else:
                assert x[key] == y[key]


LAYOUTS = {"conversation": conversation, "preference": preference, "prompt": prompt}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_tables_with_embedded_images_give_the_items_of_json_and_an_image_folder(
    world, processor, tmp_path, monkeypatch, layout
):
    raw = [LAYOUTS[layout](i) for i in range(6)]
    raw = [{"id": f"t{i}", **r} for i, r in enumerate(raw)] if layout == "conversation" else raw
    write_json(world / "same.json", raw)
    args = (tiny_tokenizer(), processor, "qwen_1_5", tokens_per_image, 2048)
    expected = items_of(
        MultimodalDataset(open_record_store(str(world / "same.json"), str(world), tmp_path / "c"), *args)
    )

    embedded = table_of(raw, world, embed=True)
    embedded.to_parquet(str(world / "same.parquet"))
    embedded.save_to_disk(str(world / "saved"))
    repo = tmp_path / "repo" / "org" / "llava-data"  # laid out like a hub dataset repo with configs
    (repo / "cfg").mkdir(parents=True)
    embedded.to_parquet(str(repo / "cfg" / "train-00000.parquet"))
    (repo / "README.md").write_text(
        "---\nconfigs:\n- config_name: cfg\n  data_files:\n  - split: train\n    path: cfg/*.parquet\n---\n"
    )
    monkeypatch.chdir(tmp_path / "repo")
    for spec in (
        str(world / "same.parquet"),
        str(world / "*.parquet"),
        str(world / "saved"),
        "org/llava-data:cfg",
    ):
        store = open_record_store(spec, None, tmp_path / "c")
        assert store.kind == layout and store.built, spec
        assert all(store.raw(i)["embedded"] for i in range(len(store)))
        assert_items_equal(items_of(MultimodalDataset(store, *args)), expected)
    paths = table_of(raw, world, embed=False)  # image paths in the table resolve like JSON's
    paths.to_parquet(str(tmp_path / "paths.parquet"))
    store = open_record_store(str(tmp_path / "paths.parquet"), str(world), tmp_path / "c")
    assert_items_equal(items_of(MultimodalDataset(store, *args)), expected)


def test_a_mixture_mixes_tables_and_json(world, processor, tmp_path):
    raw = [{"id": f"t{i}", **conversation(i)} for i in range(6)]
    table_of(raw, world, embed=True).to_parquet(str(world / "data" / "table.parquet"))
    write_json(world / "data" / "same.json", raw)
    mix = world / "mixed.yaml"
    mix.write_text(
        "datasets:\n  - json_path: data/table.parquet\n    sampling_strategy: random:50%\n"
        "  - json_path: data/beta.jsonl\n    sampling_strategy: first:2\n"
    )
    same = world / "same.yaml"
    same.write_text(mix.read_text().replace("data/table.parquet", "data/same.json"))
    args = (tiny_tokenizer(), processor, "qwen_1_5", tokens_per_image, 2048)
    mixed = MultimodalDataset(open_record_store(str(mix), str(world), tmp_path / "c", seed=1), *args)
    reference = MultimodalDataset(open_record_store(str(same), str(world), tmp_path / "c", seed=1), *args)
    assert len(mixed) == 5
    assert_items_equal(items_of(mixed), items_of(reference))


def test_duplicate_ids_are_refused_from_the_store_columns(world, tmp_path, monkeypatch):
    """refuse_duplicate_ids reads a store's ids and sources as Arrow columns, never its records."""
    raw = [prompt(i) for i in range(6)]
    raw[4]["id"] = raw[1]["id"]
    write_json(world / "data" / "dup.json", raw)
    mix = world / "dup.yaml"
    mix.write_text("datasets:\n  - json_path: data/dup.json\n  - json_path: data/grpo.json\n")
    store = open_record_store(str(mix), str(world), tmp_path / "cache")
    monkeypatch.setattr(RecordStore, "__getitem__", lambda self, index: pytest.fail("a record was built"))
    dup, grpo = world / "data" / "dup.json", world / "data" / "grpo.json"
    message = (
        f"5 sample id\\(s\\) occur more than once \\('g0' x2 in {dup}, {grpo}; 'g1' x3 in {dup}, {grpo};"
    )
    with pytest.raises(DataFileError, match=message):
        refuse_duplicate_ids(store, str(mix))
    refuse_duplicate_ids(store.select([0, 1, 2, 3, 5]), str(mix))  # unique once the repeats are dropped


def test_a_table_of_neither_layout_is_refused(world, tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"id": "a", "text": "hi"}]).to_parquet(str(tmp_path / "odd.parquet"))
    with pytest.raises(DataFileError, match="fit neither the LLaVA layout"):
        open_record_store(str(tmp_path / "odd.parquet"), None, tmp_path / "c")
