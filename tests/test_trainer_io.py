"""What the Stage-2 trainer reads and writes: the reference log-prob cache, checkpoints and resume,
`sample_order.jsonl`, and invalid records (stop before training, or skip with a written list).

Runs use the tiny presets and 12 MMPR pairs from the synthetic world (tests/train_fixtures.py).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import train_fixtures
from safetensors.torch import load_file, save_file
from train_fixtures import make_trainer, max_abs_diff, run_main, train_argv, weights

from llava.data.errors import RecordError
from llava.train.reference import load_reference_logps
from llava.train.sampling import SAMPLE_ORDER_FILE, read_sample_order

train_data = train_fixtures.train_data  # the session fixture, shared through a module cache

# ---- 4. reference log-probs ---------------------------------------------------------------------

STEP_METRICS = ("loss", "logps/chosen", "logps/rejected", "rewards/chosen", "rewards/rejected")


@pytest.mark.slow
def test_precomputed_reference_equals_live_reference(train_data, tmp_path):
    runs = {
        mode: run_main(train_argv(train_data, tmp_path / mode, "dpo", max_steps=2, reference=mode))
        for mode in ("precomputed", "live")
    }
    logs = {mode: [log for log in t.state.log_history if "loss" in log] for mode, t in runs.items()}
    assert logs["live"][0]["loss"] == pytest.approx(math.log(2.0), abs=1e-6)
    # Step 2 runs after one update, so the policy differs from the reference there: the comparison bites.
    assert abs(logs["live"][1]["rewards/chosen"]) > 1e-4
    for step in range(2):
        for key in STEP_METRICS:
            assert logs["precomputed"][step][key] == pytest.approx(
                logs["live"][step][key], rel=1e-4, abs=1e-5
            ), (
                step,
                key,
            )
    torch.testing.assert_close(
        weights(runs["precomputed"].model), weights(runs["live"].model), rtol=1e-4, atol=1e-5
    )

    cache = json.loads((tmp_path / "precomputed" / "ref_logps.json").read_text())
    assert set(cache["logps"]) == set(train_data.ids)
    assert all(len(v) == 2 and all(x < 0 for x in v) for v in cache["logps"].values())
    assert not (tmp_path / "live" / "ref_logps.json").exists()


def _write_cache(path, logps: dict[str, list[float]]) -> None:
    path.write_text(json.dumps({"reference": "test", "num_samples": len(logps), "logps": logps}))


def test_reference_cache_missing_an_id_raises(train_data, tmp_path):
    logps = {i: [-1.0, -2.0] for i in train_data.ids[1:]}
    _write_cache(tmp_path / "ref.json", logps)
    with pytest.raises(ValueError, match=re.escape(train_data.ids[0])):
        load_reference_logps(tmp_path / "ref.json", list(train_data.ids))
    run_main(train_argv(train_data, tmp_path / "first", "dpo", max_steps=1))  # a real cache for this run
    cache = json.loads((tmp_path / "first" / "ref_logps.json").read_text())
    del cache["logps"][train_data.ids[0]]
    (tmp_path / "ref_partial.json").write_text(json.dumps(cache))
    with pytest.raises(ValueError, match="lacks 1 of 12"):
        run_main(
            train_argv(train_data, tmp_path / "out", "dpo", ref_logps_path=tmp_path / "ref_partial.json")
        )
    assert not (tmp_path / "out" / SAMPLE_ORDER_FILE).exists()


def test_reference_cache_is_read_back_by_sample_id(train_data, tmp_path):
    logps = {i: [-float(n + 1), -float(n + 2)] for n, i in enumerate(train_data.ids)}
    _write_cache(tmp_path / "ref.json", logps)
    assert load_reference_logps(tmp_path / "ref.json", list(reversed(train_data.ids))) == {
        i: tuple(v) for i, v in logps.items()
    }


# ---- 7. checkpoints and resume ------------------------------------------------------------------

RESUME_FLAGS = {
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 2,
    "save_strategy": "steps",
    "save_steps": 2,
    "lr_scheduler_type": "constant",
    "weight_decay": 0.01,
}


@pytest.mark.slow
def test_resumed_run_equals_uninterrupted_run(train_data, tmp_path):
    full = run_main(train_argv(train_data, tmp_path / "full", "dpo", max_steps=4, **RESUME_FLAGS))
    expected_order = read_sample_order(tmp_path / "full")
    assert [row["step"] for row in expected_order] == [1, 2, 3, 4]

    out = tmp_path / "resumed"
    first = run_main(train_argv(train_data, out, "dpo", max_steps=2, **RESUME_FLAGS))
    assert first.state.global_step == 2 and (out / "checkpoint-2").is_dir()
    initial_model = weights(first.model)
    # Mark the logged steps (a restart from scratch would rewrite them) and add a stale later step
    # (a resume must drop it and log step 3 afresh).
    rows = read_sample_order(out)
    lines = [json.dumps({**row, "marker": True}) for row in rows]
    lines.append(json.dumps({"step": 3, "epoch": 0.0, "ids": ["stale"]}))
    (out / SAMPLE_ORDER_FILE).write_text("".join(f"{line}\n" for line in lines))

    # Same output_dir, no --resume_from_checkpoint: the entry point resumes from checkpoint-2.
    resumed = run_main(train_argv(train_data, out, "dpo", max_steps=4, **RESUME_FLAGS))
    assert resumed.state.global_step == 4
    order = read_sample_order(out)
    assert [row.get("marker", False) for row in order] == [True, True, False, False], "steps 1-2 were redone"
    assert [{k: v for k, v in row.items() if k != "marker"} for row in order] == expected_order

    final, reference = weights(resumed.model), weights(full.model)
    assert max_abs_diff(final, initial_model) > 1e-4, "steps 3-4 must change the weights"
    torch.testing.assert_close(final, reference, rtol=1e-5, atol=1e-6)


def test_checkpoint_weights_load_back_strictly(train_data, tmp_path):
    # save_pretrained may rename keys (Llava: original pre-4.52 names); resume must map them back.
    trainer = make_trainer(train_data, tmp_path / "out", loss_type="sft")
    saved = weights(trainer.model)
    checkpoint = tmp_path / "checkpoint"
    trainer.save_model(str(checkpoint))
    with torch.no_grad():
        for param in trainer.model.parameters():
            param.add_(1.0)
    trainer._load_from_checkpoint(str(checkpoint))
    torch.testing.assert_close(weights(trainer.model), saved, rtol=0, atol=0)

    tensors = load_file(str(checkpoint / "model.safetensors"))
    dropped = next(key for key in tensors if "multi_modal_projector" in key)
    save_file({k: v for k, v in tensors.items() if k != dropped}, str(checkpoint / "model.safetensors"))
    with pytest.raises(ValueError, match="multi_modal_projector"):
        trainer._load_from_checkpoint(str(checkpoint))


# ---- 8. invalid records -------------------------------------------------------------------------


def _records_with_bad_ones(train_data, tmp_path, bad: tuple[str, ...]) -> tuple[str, dict[str, str]]:
    records = train_data.records("dpo")[:6]
    reasons: dict[str, str] = {}
    if "missing_image" in bad:
        records[1] = {**records[1], "image": "images/train/does_not_exist.png"}
        reasons[records[1]["id"]] = "image file not found"
    if "empty_chosen" in bad:
        records[3] = {**records[3], "chosen": "  "}
        reasons[records[3]["id"]] = "'chosen' is empty"
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(records))
    return str(path), reasons


@pytest.mark.parametrize("bad", ["missing_image", "empty_chosen"])
def test_invalid_record_stops_the_run_before_training(train_data, tmp_path, bad: str):
    data_path, reasons = _records_with_bad_ones(train_data, tmp_path, (bad,))
    ((record_id, reason),) = reasons.items()
    out = tmp_path / "out"
    with pytest.raises(RecordError) as error:
        run_main(train_argv(train_data, out, "dpo", data_path=data_path))
    message = str(error.value)
    assert data_path in message and record_id in message and reason in message
    assert error.value.record_id == record_id
    assert not (out / SAMPLE_ORDER_FILE).exists() and not (out / "ref_logps.json").exists()


def test_skip_invalid_trains_on_the_rest_and_lists_the_skipped(train_data, tmp_path):
    data_path, reasons = _records_with_bad_ones(train_data, tmp_path, ("missing_image", "empty_chosen"))
    out = tmp_path / "out"
    trainer = run_main(
        train_argv(train_data, out, "dpo", data_path=data_path, skip_invalid=True, max_steps=2)
    )
    assert trainer.state.global_step == 2
    skipped = [json.loads(line) for line in (out / "skipped_records.jsonl").read_text().splitlines()]
    assert {row["id"] for row in skipped} == set(reasons)
    for row in skipped:
        assert reasons[row["id"]] in row["reason"] and row["file"] == data_path
    seen = {i for row in read_sample_order(out) for i in row["ids"]}
    assert seen and not seen & set(reasons)


def test_skip_invalid_that_removes_every_record_refuses_and_writes_nothing(train_data, tmp_path):
    # A wrong --image_folder makes every record invalid: before, the run logged "0 records remain",
    # trained 0 steps, exited 0 and wrote a complete-looking model and export.
    out, empty = (
        tmp_path / "out",
        tmp_path / "empty",
    )  # (a missing --image_folder is refused by the preflight)
    empty.mkdir()
    with pytest.raises(RecordError, match="leaves 0 valid record"):
        run_main(train_argv(train_data, out, "dpo", skip_invalid=True, image_folder=empty))
    assert not out.exists()


def test_fewer_records_than_one_optimizer_step_refuse(train_data, tmp_path):
    data_path, _ = _records_with_bad_ones(train_data, tmp_path, ())
    records = json.loads(Path(data_path).read_text())
    Path(data_path).write_text(json.dumps(records[:3]))
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="3 record\\(s\\), fewer than one optimizer step needs \\(4"):
        run_main(train_argv(train_data, out, "dpo", data_path=data_path, gradient_accumulation_steps=2))
    assert not out.exists()


def test_record_kind_is_decided_over_all_records(train_data, tmp_path):
    # A DPO file whose first record lacks `chosen` was called "conversations", and every record was
    # reported as missing `conversations`; now only the bad record is reported, as missing `chosen`.
    records = train_data.records("dpo")[:6]
    bad_id = records[0]["id"]
    records[0] = {k: v for k, v in records[0].items() if k != "chosen"}
    path = tmp_path / "dpo.json"
    path.write_text(json.dumps(records))
    with pytest.raises(RecordError) as error:
        run_main(train_argv(train_data, tmp_path / "out", "dpo", data_path=str(path)))
    assert error.value.record_id == bad_id and "chosen" in str(error.value)
    assert "1 invalid record" in str(error.value)


def test_skip_invalid_skips_a_missing_image(train_data, tmp_path):
    data_path, reasons = _records_with_bad_ones(train_data, tmp_path, ("missing_image",))
    out = tmp_path / "out"
    trainer = run_main(
        train_argv(
            train_data, out, "dpo", data_path=data_path, skip_invalid=True, max_steps=3, reference="live"
        )
    )
    assert trainer.state.global_step == 3 and len(trainer.train_dataset) == 5
    skipped = [json.loads(line) for line in (out / "skipped_records.jsonl").read_text().splitlines()]
    assert [row["id"] for row in skipped] == list(reasons)
    assert reasons[skipped[0]["id"]] in skipped[0]["reason"] and skipped[0]["file"] == data_path
    seen = {i for row in read_sample_order(out) for i in row["ids"]}
    assert seen and not seen & set(reasons)


def test_skip_invalid_removes_records_by_position_not_by_id(tmp_path):
    """Mixtures may repeat ids: only the invalid record goes, and skipped_records.jsonl lists exactly it."""
    from data_fixtures import tiny_tokenizer

    from llava.data.dataset import MultimodalDataset
    from llava.data.mixture import load_records
    from llava.train.train import SKIPPED_FILE, handle_invalid

    def record(record_id: str, reply: str) -> dict:
        return {
            "id": record_id,
            "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": reply}],
        }

    long_reply = "red " * 100
    files = {
        "a": [record("1", "Hello there."), record("1", long_reply), record("2", "Fine.")],
        "b": [record("2", long_reply)],
        "c": [{"id": "1"}],  # fails parsing: never enters the dataset
    }
    for name, records in files.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(records))
    mixture = tmp_path / "mix.yaml"
    mixture.write_text("datasets:\n" + "".join(f"- json_path: {name}.json\n" for name in files))
    path = {name: str(tmp_path / f"{name}.json") for name in files}

    def load() -> tuple[MultimodalDataset, list[RecordError]]:
        parse_errors: list[RecordError] = []
        records = load_records(str(mixture), None, "conversation", errors=parse_errors)
        return MultimodalDataset(
            records, tiny_tokenizer(), None, "qwen_1_5", lambda h, w: 1, 50
        ), parse_errors

    dataset, parse_errors = load()
    invalid = dataset.invalid_records()
    assert [(position, error.record_id) for position, error in invalid] == [(1, "1"), (3, "2")]
    with pytest.raises(RecordError, match="3 invalid record"):
        handle_invalid(dataset, parse_errors, invalid, False, str(tmp_path / "unused"))
    assert len(dataset) == 4 and not (tmp_path / "unused").exists()

    handle_invalid(dataset, parse_errors, invalid, True, str(tmp_path / "out"))
    kept = [(record.source, record.id, record.turns[0][1]) for record in dataset.records]
    assert kept == [(path["a"], "1", "Hello there."), (path["a"], "2", "Fine.")]
    skipped = [json.loads(line) for line in (tmp_path / "out" / SKIPPED_FILE).read_text().splitlines()]
    assert [(row["file"], row["id"], row.get("position")) for row in skipped] == [
        (path["c"], "1", None),
        (path["a"], "1", 1),
        (path["b"], "2", 3),
    ]
    assert "missing key 'conversations'" in skipped[0]["reason"]
    assert all("model_max_length 50" in row["reason"] for row in skipped[1:])


def test_reference_cache_made_for_another_run_is_refused(train_data, tmp_path):
    out = tmp_path / "out"
    run_main(train_argv(train_data, out, "dpo", max_steps=1))
    cache = out / "ref_logps.json"
    assert json.loads(cache.read_text())["reference"]["data_path"].endswith(".json")
    other = tmp_path / "other"
    with pytest.raises(ValueError, match="was made for .* not for this run"):
        run_main(train_argv(train_data, other, "dpo", max_steps=1, ref_logps_path=str(cache), seed=7))


def test_auto_resume_refuses_checkpoints_of_another_loss(train_data, tmp_path):
    out = tmp_path / "out"
    run_main(train_argv(train_data, out, "sft", max_steps=1, save_strategy="steps", save_steps=1))
    assert (out / "checkpoint-1").is_dir()
    with pytest.raises(ValueError, match="started with other settings") as error:
        run_main(train_argv(train_data, out, "dpo", max_steps=2))
    assert "loss_type: 'sft' -> 'dpo'" in str(error.value)
    assert not (out / "ref_logps.json").exists(), "refused before the reference pass"
