"""The cached, parallel validation of a record store (llava.data.validation) and its sharing across
processes (llava.data.prepared): reused when nothing changed, rebuilt when data, tokenizer, template,
model_max_length or the image-token count change; two gloo processes build it once."""

from __future__ import annotations

import copy
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import tiny_tokenizer, write_image, write_json

from llava.data.dataset import MultimodalDataset
from llava.data.mixture import load_records
from llava.data.store import open_record_store
from llava.data.validation import validate_store

REPO = Path(__file__).resolve().parents[1]


def per_image(height: int, width: int) -> int:
    return (height // 8) * (width // 8)


def record(index: int) -> dict:
    return {
        "id": f"p{index}",
        "image": {4: "images/missing.png", 6: "images/garbage.png"}.get(index, f"images/{index % 2}.png"),
        "prompt": f"What is {index}?",
        "chosen": "yes " * (2 + 3 * index),
        "rejected": "no " * (1 + index % 3),
    }


@pytest.fixture
def world(tmp_path):
    write_image(tmp_path / "images" / "0.png", size=(40, 24))
    write_image(tmp_path / "images" / "1.png", size=(16, 32))
    (tmp_path / "images" / "garbage.png").write_bytes(b"not an image" * 4)
    write_json(tmp_path / "dpo.json", [record(i) for i in range(10)])
    return tmp_path


def store_dataset(world, cache, tokenizer=None, template="qwen_1_5", max_length=62, count=per_image):
    store = open_record_store(str(world / "dpo.json"), str(world), cache)
    return MultimodalDataset(store, tokenizer or tiny_tokenizer(), None, template, count, max_length)


def test_validation_equals_the_list_check_and_its_lengths(world, tmp_path):
    cache = tmp_path / "cache"
    dataset = store_dataset(world, cache)
    validation = validate_store(dataset)
    records = load_records(str(world / "dpo.json"), str(world), "preference")
    old = MultimodalDataset(records, tiny_tokenizer(), None, "qwen_1_5", per_image, 62).invalid_records()
    assert validation.built
    assert [(p, type(e), str(e)) for p, e in validation.invalid] == [(p, type(e), str(e)) for p, e in old]
    reasons = {p: type(e).__name__ for p, e in old}
    assert reasons == {
        4: "MissingImageError",
        6: "UnreadableImageError",
        8: "SequenceTooLongError",
        9: "SequenceTooLongError",
    }
    for position in set(range(10)) - set(reasons):
        tokens = dataset._tokenize(records[position], [(24, 40) if position % 2 == 0 else (32, 16)])
        assert validation.lengths[position] == len(tokens["input_ids"])
        assert validation.rejected_lengths[position] == len(tokens["rejected_input_ids"])
    shared = validation.shared_lengths()
    assert (shared == np.maximum(validation.lengths, validation.rejected_lengths)).all()


def test_validation_in_parallel_equals_one_process(world, tmp_path):
    one = validate_store(store_dataset(world, tmp_path / "one"), num_proc=1)
    two = validate_store(store_dataset(world, tmp_path / "two"), num_proc=2)
    assert one.built and two.built
    assert [(p, str(e)) for p, e in one.invalid] == [(p, str(e)) for p, e in two.invalid]
    assert (one.lengths == two.lengths).all() and (one.rejected_lengths == two.rejected_lengths).all()


def test_validation_is_reused_and_rebuilt_when_an_input_changes(world, tmp_path):
    cache = tmp_path / "cache"
    first = validate_store(store_dataset(world, cache))
    assert first.built and not validate_store(store_dataset(world, cache)).built
    tokenizer = copy.deepcopy(tiny_tokenizer())
    tokenizer.add_tokens(["yes no"])
    changes = {
        "tokenizer": {"tokenizer": tokenizer},
        "template": {"template": "plain"},
        "model_max_length": {"max_length": 63},
        "image-token count": {"count": lambda height, width: 2},
    }
    for name, change in changes.items():
        assert validate_store(store_dataset(world, cache, **change)).built, name
        assert not validate_store(store_dataset(world, cache, **change)).built, name
    restricted = store_dataset(world, cache)
    restricted.keep([9, 0, 5])  # a dataset restricted by --skip_invalid reads its rows' results
    again = validate_store(restricted)
    assert not again.built and again.lengths.tolist() == first.lengths[[9, 0, 5]].tolist()
    data = json.loads((world / "dpo.json").read_text())
    data[0]["chosen"] = "yes " * 5
    write_json(world / "dpo.json", data)
    changed = validate_store(store_dataset(world, cache))
    assert changed.built and changed.lengths[0] > first.lengths[0]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


TWO_PROCESSES = """
import json, sys
import torch.distributed as dist
from data_fixtures import tiny_tokenizer
from llava.data.prepared import DataSettings, prepare_dataset
from llava.train.args import PivotTrainingArguments

world, out = sys.argv[1], sys.argv[2]
args = PivotTrainingArguments(output_dir=out, use_cpu=True, ddp_backend="gloo", report_to="none")
settings = DataSettings(f"{world}/dpo.json", world, "qwen_1_5", 62, f"{out}/cache", group_by_length=True)
with args.main_process_first(local=False, desc="data"):
    prepared = prepare_dataset(
        settings, tiny_tokenizer(), None, lambda h, w: (h // 8) * (w // 8), build=args.process_index == 0
    )
dataset = prepared.dataset
result = {
    "world_size": args.world_size,
    "store_built": dataset.records.built,
    "validation_built": prepared.validation.built,
    "ids": dataset.ids,
    "lengths": dataset.group_lengths.tolist(),
    "invalid": [p for p, _ in prepared.validation.invalid],
}
open(f"{out}/rank{args.process_index}.json", "w").write(json.dumps(result))
dist.barrier()
"""


@pytest.mark.slow
def test_two_processes_share_one_store_and_one_validation(world, tmp_path):
    script = tmp_path / "two.py"
    script.write_text(TWO_PROCESSES)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        "--master_addr=127.0.0.1",
        f"--master_port={free_port()}",
        str(script),
        str(world),
        str(out),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    ranks = [json.loads((out / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert [(r["store_built"], r["validation_built"]) for r in ranks] == [(True, True), (False, False)]
    assert ranks[0]["ids"] == ranks[1]["ids"] and ranks[0]["lengths"] == ranks[1]["lengths"]
    assert ranks[0]["invalid"] == ranks[1]["invalid"] == [4, 6, 8, 9]
    assert len(list((out / "cache").glob("records-*"))) == 1
    assert len(list((out / "cache").glob("records-*/validation-*"))) == 1
