"""`--group_by_length` (issue 17): samples sorted by a length SFT and DPO runs share, within seeded
mega-batches of one optimizer step, so both runs still see identical ids in identical order (one process
and two gloo processes), and the padding fraction is logged."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import train_fixtures
from test_distributed import torchrun
from train_fixtures import run_main, train_argv

from llava.train.sampling import grouped_order, matched_order, read_sample_order

train_data = train_fixtures.train_data


def test_grouped_order_sorts_each_mega_batch_of_the_matched_order():
    ids = [f"s{i}" for i in range(23)]
    lengths = np.array([(7 * i) % 11 for i in range(23)])
    for epoch in (0, 1):
        matched = matched_order(ids, 5, epoch)
        grouped = grouped_order(ids, lengths, 5, epoch, 4)
        assert grouped == grouped_order(ids, lengths, 5, epoch, 4)
        for start in range(0, 23, 4):
            chunk = grouped[start : start + 4]
            assert sorted(chunk) == sorted(matched[start : start + 4])  # same samples per mega-batch
            assert list(lengths[chunk]) == sorted(lengths[chunk], reverse=True)
            ties = [i for i in matched[start : start + 4] if lengths[i] == lengths[chunk[0]]]
            assert [
                i for i in chunk if lengths[i] == lengths[chunk[0]]
            ] == ties  # ties keep the matched order
    assert grouped_order(ids, lengths, 5, 0, 1) == matched_order(ids, 5, 0)
    with pytest.raises(ValueError, match="lengths for"):
        grouped_order(ids, lengths[:3], 5, 0, 4)


GROUPED = {"group_by_length": True, "max_steps": 3, "per_device_train_batch_size": 2}


def grouped_argv(train_data, out: Path, loss_type: str, cache: Path, **flags) -> list[str]:
    extra = {"length_data_path": train_data.dpo_json} if loss_type == "sft" else {}
    return train_argv(train_data, out, loss_type, data_cache_dir=cache, **GROUPED, **extra, **flags)


def dpo_lengths(cache: Path) -> dict[str, int]:
    """id → prompt + longer reply of the DPO records, from the validation the runs cached."""
    from datasets import load_from_disk

    from llava.data.store import RecordStore

    stores = [RecordStore(p) for p in cache.glob("records-*") if p.is_dir() and "tmp" not in p.name]
    (store,) = [s for s in stores if s.kind == "preference"]  # one DPO store, shared by both runs
    (validation_dir,) = store.directory.glob("validation-*")
    table = load_from_disk(str(validation_dir / "saved"))
    longer = np.maximum(np.asarray(table["length"]), np.asarray(table["rejected_length"]))
    return dict(zip(store.ids, longer.tolist()))


def assert_steps_sorted(order: list[dict], lengths: dict[str, int]) -> None:
    assert [len(row["ids"]) for row in order] == [4, 4, 4]
    for row in order:
        step = [lengths[i] for i in row["ids"]]
        assert step == sorted(step, reverse=True), "each optimizer step is sorted by the shared length"


@pytest.mark.slow
def test_sft_and_dpo_see_the_same_grouped_order(train_data, tmp_path):
    cache = tmp_path / "cache"
    runs = {}
    for loss_type in ("sft", "dpo"):
        runs[loss_type] = tmp_path / loss_type
        run_main(grouped_argv(train_data, runs[loss_type], loss_type, cache, gradient_accumulation_steps=2))
    sft, dpo = read_sample_order(runs["sft"]), read_sample_order(runs["dpo"])
    assert sft == dpo
    assert_steps_sorted(sft, dpo_lengths(cache))
    plain = read_sample_order(_plain_run(train_data, tmp_path / "plain", cache))
    assert [sorted(r["ids"]) for r in plain] == [sorted(r["ids"]) for r in sft]  # same samples per step
    assert plain != sft
    for out in runs.values():
        logs = json.loads((out / "trainer_state.json").read_text())["log_history"]
        fractions = [row["padding_fraction"] for row in logs if "padding_fraction" in row]
        assert len(fractions) == 3 and all(0.0 <= f < 1.0 for f in fractions)


def _plain_run(train_data, out: Path, cache: Path) -> Path:
    run_main(
        train_argv(
            train_data,
            out,
            "dpo",
            data_cache_dir=cache,
            max_steps=3,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=2,
        )
    )
    return out


@pytest.mark.slow
def test_grouped_order_holds_across_ranks(train_data, tmp_path):
    cache = tmp_path / "cache"
    orders = {}
    for loss_type in ("sft", "dpo"):
        out = tmp_path / f"{loss_type}_2proc"
        torchrun([*grouped_argv(train_data, out, loss_type, cache), "--ddp_backend=gloo"], nproc=2)
        orders[loss_type] = read_sample_order(out)
    one = tmp_path / "dpo_1proc"
    run_main(grouped_argv(train_data, one, "dpo", cache, gradient_accumulation_steps=2))
    assert orders["sft"] == orders["dpo"] == read_sample_order(one)
    assert_steps_sorted(orders["sft"], dpo_lengths(cache))
