"""Record parsing and validation: schemas, defaults, and every error naming file, id and reason."""

from __future__ import annotations

import os
import pickle

import pytest

from llava.data.errors import (
    EmptyResponseError,
    ImageTokenMismatchError,
    InvalidRoleError,
    MalformedRecordError,
    MissingImageError,
    MissingKeyError,
    RecordError,
    UnreadableImageError,
)
from llava.data.images import load_image
from llava.data.records import (
    ConversationRecord,
    PreferenceRecord,
    parse_conversation_record,
    parse_preference_record,
    parse_record,
)

SOURCE = "/data/world/llava/instruct.json"


def conversation(*turns: tuple[str, str], **extra) -> dict:
    return {"conversations": [{"from": role, "value": value} for role, value in turns], **extra}


def assert_names_file_and_id(error: RecordError, record_id: str) -> None:
    assert error.path == SOURCE and error.record_id == record_id
    assert SOURCE in str(error) and repr(record_id) in str(error) and error.reason in str(error)


def test_conversation_record_fields():
    raw = conversation(
        ("human", "<image>\nWhat colour?"), ("gpt", "Red."), ("human", "Shape?"), ("gpt", "Star.")
    )
    raw.update(id="r1", image="images/train/0.png")
    record = parse_conversation_record(raw, SOURCE, 0, image_folder="/world")
    assert record == ConversationRecord(
        id="r1",
        images=["/world/images/train/0.png"],
        turns=[("<image>\nWhat colour?", "Red."), ("Shape?", "Star.")],
        source=SOURCE,
    )


def test_image_list_absolute_paths_and_no_folder():
    raw = conversation(
        ("human", "<image> <image> compare"), ("gpt", "Same."), id=7, image=["/abs/a.png", "b.png"]
    )
    record = parse_conversation_record(raw, SOURCE, 0, image_folder="/world")
    assert record.images == ["/abs/a.png", os.path.join("/world", "b.png")]
    assert record.id == "7"  # non-string ids become strings
    assert parse_conversation_record(raw, SOURCE, 0).images == ["/abs/a.png", "b.png"]


def test_text_only_record_and_default_id():
    raw = conversation(("human", "Say hi."), ("gpt", "Hi."))
    record = parse_conversation_record(raw, SOURCE, 12)
    assert record.images == [] and record.id == "instruct:12"
    assert parse_conversation_record({**raw, "image": []}, SOURCE, 0).images == []


def test_placeholders_prepended_when_absent():
    raw = conversation(("human", "Which is larger?"), ("gpt", "The left one."), image=["a.png", "b.png"])
    record = parse_conversation_record(raw, SOURCE, 0)
    assert record.turns[0][0] == "<image>\n<image>\nWhich is larger?"
    pref = parse_preference_record(
        {"image": "a.png", "prompt": "Count.", "chosen": "2", "rejected": "3"}, SOURCE, 0
    )
    assert pref.prompt == "<image>\nCount."


def test_placeholder_in_a_later_turn_is_kept():
    raw = conversation(
        ("human", "Hello."), ("gpt", "Hi."), ("human", "<image>\nWhat is it?"), ("gpt", "A cat.")
    )
    record = parse_conversation_record({**raw, "image": "a.png"}, SOURCE, 0)
    assert record.turns[0][0] == "Hello." and record.turns[1][0] == "<image>\nWhat is it?"


def test_preference_record_fields():
    raw = {
        "id": "p",
        "image": "x.png",
        "prompt": "<image>\nQ?",
        "chosen": "A",
        "rejected": "B",
        "meta": {"box": [1, 2]},
    }
    record = parse_preference_record(raw, SOURCE, 0, image_folder="/w")
    assert record == PreferenceRecord("p", ["/w/x.png"], "<image>\nQ?", "A", "B", {"box": [1, 2]}, SOURCE)
    assert parse_record(raw, SOURCE, 0, "preference", "/w") == record
    with pytest.raises(ValueError, match="unknown record kind"):
        parse_record(raw, SOURCE, 0, "dpo")


@pytest.mark.parametrize(
    ("raw", "error_type", "reason"),
    [
        ({"id": "a"}, MissingKeyError, "'conversations'"),
        (
            conversation(("human", "Q"), ("gpt", "A"), id="a") | {"conversations": [{"from": "human"}]},
            MissingKeyError,
            "'value'",
        ),
        (
            conversation(("human", "Q"), ("gpt", "A"), id="a") | {"conversations": [{"value": "Q"}]},
            MissingKeyError,
            "'from'",
        ),
        (conversation(("gpt", "A"), ("human", "Q"), id="a"), InvalidRoleError, "alternate"),
        (conversation(("human", "Q"), ("human", "Q"), id="a"), InvalidRoleError, "alternate"),
        (conversation(("human", "Q"), ("gpt", "A"), ("human", "Q"), id="a"), InvalidRoleError, "end with"),
        (conversation(("user", "Q"), ("assistant", "A"), id="a"), InvalidRoleError, "alternate"),
        (conversation(("human", "Q"), ("gpt", "  \n"), id="a"), EmptyResponseError, "empty"),
        (
            conversation(("human", "<image>\n<image>\nQ"), ("gpt", "A"), id="a", image="x.png"),
            ImageTokenMismatchError,
            "2",
        ),
        (conversation(("human", "<image>\nQ"), ("gpt", "A"), id="a"), ImageTokenMismatchError, "0 image"),
        (
            conversation(("human", "<image>\nQ"), ("gpt", "<image>"), id="a", image="x.png"),
            ImageTokenMismatchError,
            "reply",
        ),
        (conversation(("human", "Q"), ("gpt", "A"), id="a", image=3), MalformedRecordError, "'image'"),
        ({"id": "a", "conversations": "Q"}, MalformedRecordError, "'conversations'"),
        (conversation(("human", 5), ("gpt", "A"), id="a"), MalformedRecordError, "'value'"),
    ],
)
def test_conversation_errors_name_file_and_id(raw, error_type, reason):
    with pytest.raises(error_type, match=reason) as info:
        parse_conversation_record(raw, SOURCE, 3)
    assert_names_file_and_id(info.value, "a")


@pytest.mark.parametrize(
    ("raw", "error_type", "reason"),
    [
        ({"prompt": "Q", "chosen": "A"}, MissingKeyError, "'rejected'"),
        ({"chosen": "A", "rejected": "B"}, MissingKeyError, "'prompt'"),
        ({"prompt": "Q", "chosen": "", "rejected": "B"}, EmptyResponseError, "'chosen'"),
        ({"prompt": "Q", "chosen": "A", "rejected": " "}, EmptyResponseError, "'rejected'"),
        (
            {"prompt": "<image><image>Q", "chosen": "A", "rejected": "B", "image": "x.png"},
            ImageTokenMismatchError,
            "2",
        ),
        ({"prompt": "Q", "chosen": "A", "rejected": "B", "meta": [1]}, MalformedRecordError, "'meta'"),
    ],
)
def test_preference_errors_name_file_and_default_id(raw, error_type, reason):
    with pytest.raises(error_type, match=reason) as info:
        parse_preference_record(raw, SOURCE, 4)
    assert_names_file_and_id(info.value, "instruct:4")


def test_non_object_record():
    with pytest.raises(MalformedRecordError, match="not an object") as info:
        parse_conversation_record(["not", "a", "dict"], SOURCE, 2)
    assert_names_file_and_id(info.value, "instruct:2")


def test_record_error_message_and_pickle():
    error = MissingImageError(SOURCE, "r9", "image file not found: /x.png")
    assert str(error) == f"{SOURCE}: record 'r9': image file not found: /x.png"
    assert isinstance(error, ValueError)
    restored = pickle.loads(pickle.dumps(error))
    assert type(restored) is MissingImageError and str(restored) == str(error)


def test_load_image_errors_and_rgb(tmp_path):
    from PIL import Image

    with pytest.raises(MissingImageError, match="not found") as info:
        load_image(str(tmp_path / "nope.png"), "r1", SOURCE)
    assert_names_file_and_id(info.value, "r1")
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"\x89PNG this is not really an image" * 4)
    with pytest.raises(UnreadableImageError, match="garbage.png") as info:
        load_image(str(garbage), "r2", SOURCE)
    assert_names_file_and_id(info.value, "r2")
    grey = tmp_path / "grey.png"
    Image.new("LA", (5, 3), (7, 128)).save(grey)
    image = load_image(str(grey), "r3", SOURCE)
    assert image.mode == "RGB" and image.size == (5, 3) and image.getpixel((0, 0)) == (7, 7, 7)


def test_load_image_refuses_a_truncated_file_whatever_pils_global_flag(tmp_path, monkeypatch):
    """lmms-eval sets PIL's ImageFile.LOAD_TRUNCATED_IMAGES on import; load_image must still refuse."""
    import numpy as np
    from PIL import Image, ImageFile

    full = tmp_path / "full.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(full)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    with pytest.raises(UnreadableImageError, match="truncated.png") as info:
        load_image(str(truncated), "r4", SOURCE)
    assert_names_file_and_id(info.value, "r4")
    assert ImageFile.LOAD_TRUNCATED_IMAGES is True  # the process-wide setting is left as it was
    assert load_image(str(full), "r5", SOURCE).size == (64, 64)
