"""A corrupt image (header fine, pixels truncated) at load time (issue 17): under --skip_invalid the item
is replaced by the same record in an SFT and a DPO run and listed in skipped_records.jsonl; without it
the run stops naming the image, the data file, the record and the reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import train_fixtures
from train_fixtures import run_main, train_argv

from llava.data.errors import UnreadableImageError
from llava.train.sampling import read_sample_order
from llava.train.train import SKIPPED_FILE

train_data = train_fixtures.train_data
CORRUPT = 5  # index of the pair whose image is truncated


def with_truncated_image(train_data, tmp_path: Path) -> tuple[dict[str, Path], str, Path]:
    """Both jsons with pair CORRUPT pointing at a truncated copy of its image: (paths, its id, image)."""
    dpo, sft = train_data.records("dpo"), train_data.records("sft")
    assert dpo[CORRUPT]["id"] == sft[CORRUPT]["id"]
    source = train_data.world / dpo[CORRUPT]["image"]
    data = source.read_bytes()
    image = tmp_path / "truncated.png"
    image.write_bytes(data[: len(data) // 2])
    paths = {}
    for name, records in (("dpo", dpo), ("sft", sft)):
        records[CORRUPT] = {**records[CORRUPT], "image": str(image)}
        paths[name] = tmp_path / f"{name}.json"
        paths[name].write_text(json.dumps(records))
    return paths, dpo[CORRUPT]["id"], image


@pytest.mark.slow
def test_a_truncated_image_is_replaced_alike_in_sft_and_dpo_runs(train_data, tmp_path):
    paths, bad_id, image = with_truncated_image(train_data, tmp_path)
    runs = {}
    for loss_type in ("sft", "dpo"):
        runs[loss_type] = tmp_path / loss_type
        flags = {"data_path": paths[loss_type], "skip_invalid": True, "max_steps": 3}
        run_main(train_argv(train_data, runs[loss_type], loss_type, gradient_accumulation_steps=2, **flags))
    orders = {name: read_sample_order(out) for name, out in runs.items()}
    assert orders["sft"] == orders["dpo"]
    ids = [i for row in orders["sft"] for i in row["ids"]]
    assert bad_id not in ids and len(ids) == len(train_data.ids)
    skipped = {
        name: [json.loads(line) for line in (out / SKIPPED_FILE).read_text().splitlines()]
        for name, out in runs.items()
    }
    assert [len(rows) for rows in skipped.values()] == [1, 1]
    for name, (row,) in skipped.items():
        assert row["id"] == bad_id and str(image) in row["reason"] and row["file"] == str(paths[name])
    assert skipped["sft"][0]["replaced_by"] == skipped["dpo"][0]["replaced_by"]
    row = skipped["sft"][0]
    assert ids.count(row["replaced_by"]) == 2  # the replacement is trained on twice this epoch, in both runs


@pytest.mark.slow
def test_without_skip_invalid_a_truncated_image_stops_the_run(train_data, tmp_path):
    paths, bad_id, image = with_truncated_image(train_data, tmp_path)
    argv = train_argv(train_data, tmp_path / "out", "sft", data_path=paths["sft"], max_steps=3)
    with pytest.raises(UnreadableImageError) as raised:
        run_main([*argv, "--gradient_accumulation_steps=2"])
    error = raised.value
    assert error.record_id == bad_id and error.path == str(paths["sft"])
    assert f"cannot decode image {image}" in error.reason and "truncated" in error.reason
