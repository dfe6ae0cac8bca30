"""The MMPR converter's training-time length check (`llava.data.mmpr_fit`): every record it writes fits
training (the prompt and each response with its image tokens within the model's length), and the ones it
excludes really fail training's own validation (`MultimodalDataset.validate`)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_mmpr import _png

from llava.data.mmpr import MMPRConfig, convert_mmpr, main, write_conversion

SQUARE_TOKENS = 576  # one 384² SigLIP image, patch 16, square (the paper's setting)
RED = " red"  # one token of the tiny tokenizer


@dataclass
class LongFixture:
    meta: Path
    world: Path
    tokenizer: Path
    ids: dict[str, str]  # case name -> record id


@pytest.fixture(scope="module")
def long_fx(tmp_path_factory: pytest.TempPathFactory) -> LongFixture:
    """Items that pass PIVOT's 1500-token text limit but not training at 2048 with 576 tokens per image."""
    from data_fixtures import tiny_tokenizer

    world = tmp_path_factory.mktemp("long_world")
    tokenizer = world / "tokenizer"
    tiny_tokenizer().save_pretrained(tokenizer)
    _png(world / "images" / "a.png")
    cases = {
        "long_chosen": {"image": "a.png", "question": "<image>\nColour?", "chosen": "It is" + RED * 1480},
        "long_rejected": {
            "image": "a.png",
            "question": "Colour?",
            "chosen": "Red.",
            "rejected": "No" + RED * 2100,
        },
        "four_images": {"image": ["a.png"] * 4, "question": "Compare.", "chosen": "Equal."},
        "ok_image": {"image": "a.png", "question": "<image>\nOk?", "chosen": "Red."},
        "ok_text": {"question": "Say hi.", "chosen": "Hi" + RED * 600},
    }
    lines = [{"rejected": "Blue.", **case} for case in cases.values()]
    (world / "ann.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    meta = world / "meta.json"
    meta.write_text(json.dumps({"d": {"root": "images", "annotation": "ann.jsonl"}}))
    ids = {name: f"d/{line}" for line, name in enumerate(cases, start=1)}
    return LongFixture(meta, world, tokenizer, ids)


def _convert_long(fx: LongFixture, **kwargs):
    settings = {"size": 5, "tokenizer": str(fx.tokenizer), "image_folder": str(fx.world), "allow_fewer": True}
    return convert_mmpr(MMPRConfig(meta_path=str(fx.meta), **{**settings, **kwargs}))


def _training_errors(path: Path, kind: str, world: Path, image_tokens: int, max_length: int) -> list:
    """What training's pre-training check (MultimodalDataset.validate) says about a written json."""
    from data_fixtures import tiny_tokenizer

    from llava.data.dataset import MultimodalDataset
    from llava.data.mixture import load_records

    records = load_records(str(path), str(world), kind)
    dataset = MultimodalDataset(
        records, tiny_tokenizer(), None, "qwen_1_5", lambda h, w: image_tokens, max_length
    )
    return dataset.validate()


def test_every_written_record_fits_training_on_both_sides(long_fx: LongFixture, tmp_path: Path) -> None:
    conv = _convert_long(long_fx)
    ids = long_fx.ids
    assert [r["id"] for r in conv.dpo] == [r["id"] for r in conv.sft]
    assert {r["id"] for r in conv.dpo} == {ids["ok_image"], ids["ok_text"]}
    excluded = {e["id"]: e for e in conv.report["excluded"]}
    assert {i: e["kind"] for i, e in excluded.items()} == {
        ids["long_chosen"]: "too_long_for_training",
        ids["long_rejected"]: "too_long_for_training",
        ids["four_images"]: "too_many_images",
    }
    assert "prompt+chosen" in excluded[ids["long_chosen"]]["reason"]
    assert "prompt+rejected" in excluded[ids["long_rejected"]]["reason"]
    assert all(e["path"] == str(long_fx.world / "ann.jsonl") for e in excluded.values())
    totals = conv.report["totals"]
    assert (totals["too_long_for_training"], totals["too_many_images"], totals["token_over_limit"]) == (
        2,
        1,
        0,
    )
    paths = write_conversion(conv, tmp_path / "dpo.json", tmp_path / "sft.json")
    for kind, path in (("preference", paths["dpo"]), ("conversation", paths["sft"])):
        assert _training_errors(path, kind, long_fx.world, SQUARE_TOKENS, 2048) == []
    assert json.loads(paths["report"].read_text())["excluded"] == conv.report["excluded"]


def test_excluded_records_really_fail_training(long_fx: LongFixture, tmp_path: Path) -> None:
    """Without the check (and without max_images) the same input yields records training rejects."""
    conv = _convert_long(long_fx, model_max_length=0, max_images=0)
    assert len(conv.dpo) == 5 and conv.report["excluded"] == []
    paths = write_conversion(conv, tmp_path / "dpo.json", tmp_path / "sft.json")
    ids = long_fx.ids
    dpo = _training_errors(paths["dpo"], "preference", long_fx.world, SQUARE_TOKENS, 2048)
    sft = _training_errors(paths["sft"], "conversation", long_fx.world, SQUARE_TOKENS, 2048)
    assert {e.record_id for e in dpo} == {ids["long_chosen"], ids["long_rejected"], ids["four_images"]}
    assert {e.record_id for e in sft} == {ids["long_chosen"], ids["four_images"]}  # SFT and DPO would differ


def test_training_check_is_exact_at_the_boundary(long_fx: LongFixture) -> None:
    """The longest kept side is exactly model_max_length: one token less excludes the record."""
    from data_fixtures import tiny_tokenizer

    from llava.data.records import parse_record
    from llava.data.tokenization import tokenize_preference

    target = long_fx.ids["long_chosen"]
    record = next(r for r in _convert_long(long_fx, model_max_length=0).dpo if r["id"] == target)
    parsed = parse_record(record, "x", 0, "preference")
    sides = tokenize_preference(
        parsed.prompt, parsed.chosen, parsed.rejected, tiny_tokenizer(), "qwen_1_5", [SQUARE_TOKENS], 10**6
    )
    longest = max(len(sides["input_ids"]), len(sides["rejected_input_ids"]))
    assert longest > 2048  # the case is too long at the paper's length
    fits = _convert_long(long_fx, model_max_length=longest)
    assert target in {r["id"] for r in fits.dpo}
    too_short = _convert_long(long_fx, model_max_length=longest - 1)
    assert target not in {r["id"] for r in too_short.dpo}
    assert f"{longest} tokens" in next(e for e in too_short.report["excluded"] if e["id"] == target)["reason"]


def test_image_tokens_and_max_images_flags(long_fx: LongFixture, tmp_path: Path) -> None:
    ids = long_fx.ids
    few = _convert_long(long_fx, image_tokens=16)  # the tiny demo at 32 px: (32 / 8)² tokens per image
    assert {r["id"] for r in few.dpo} == {ids["long_chosen"], ids["ok_image"], ids["ok_text"]}
    multi = _convert_long(long_fx, max_images=4, image_tokens=16)
    assert ids["four_images"] in {r["id"] for r in multi.dpo}
    assert main(
        [
            "--meta_path",
            str(long_fx.meta),
            "--out_dir",
            str(tmp_path),
            "--size",
            "3",
            "--tokenizer",
            str(long_fx.tokenizer),
            "--image_folder",
            str(long_fx.world),
            "--image_tokens",
            "16",
            "--model_max_length",
            "2048",
        ]
    )
    report = json.loads((tmp_path / "mmpr_report.json").read_text())
    assert report["settings"]["image_tokens"] == 16 and report["settings"]["max_images"] == 1
    assert [e["id"] for e in report["excluded"]] == [ids["four_images"], ids["long_rejected"]]
    written = {r["id"] for r in json.loads((tmp_path / "mmpr_dpo.json").read_text())}
    assert (
        written
        == {r["id"] for r in json.loads((tmp_path / "mmpr_sft.json").read_text())}
        == {r["id"] for r in few.dpo}
    )
