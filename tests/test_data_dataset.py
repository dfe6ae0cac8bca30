"""MultimodalDataset items, validate(), and DataCollator batches with a tiny SigLIP image processor."""

from __future__ import annotations

import pytest
import torch
from data_fixtures import IGNORE, supervised_spans, tiny_tokenizer, write_image, write_jsonl
from PIL import Image
from torch.utils.data import DataLoader
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

from llava.data.collator import DataCollator
from llava.data.dataset import MultimodalDataset
from llava.data.errors import (
    EmptyResponseError,
    ImageTokenMismatchError,
    MissingImageError,
    SequenceTooLongError,
    UnreadableImageError,
)
from llava.data.mixture import load_records
from llava.data.records import ConversationRecord, PreferenceRecord

IMAGE_ID = 3
PATCH = 8


def tokens_per_image(height: int, width: int) -> int:
    """An anyres-like count that depends on the original size, so h and w cannot be swapped unnoticed."""
    return (height // PATCH) * (width // PATCH)


@pytest.fixture(scope="module")
def processor():
    return SiglipImageProcessorPil(size={"height": 32, "width": 32})


@pytest.fixture
def world(tmp_path):
    write_image(tmp_path / "images" / "wide.png", size=(40, 24))  # PIL (w, h): h=24, w=40 -> 3*5 tokens
    write_image(tmp_path / "images" / "tall.png", size=(16, 32), colour=(0, 0, 255))  # h=32, w=16 -> 4*2
    (tmp_path / "images" / "garbage.png").write_bytes(b"not a png at all" * 8)
    return tmp_path


def conv(record_id: str, images: list[str], human: str, reply: str) -> dict:
    raw = {
        "id": record_id,
        "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": reply}],
    }
    return raw | ({"image": images} if images else {})


def make_dataset(records, processor, template="qwen_1_5", max_length=2048) -> MultimodalDataset:
    return MultimodalDataset(records, tiny_tokenizer(), processor, template, tokens_per_image, max_length)


def conversation_records(world) -> list[ConversationRecord]:
    raw = [
        conv("two", ["images/wide.png", "images/tall.png"], "<image> and <image>: same colour?", "No."),
        conv("text", [], "Say hi.", "Hi there!"),
        conv("one", ["images/wide.png"], "What colour is it?", "Red."),
    ]
    return load_records(str(write_jsonl(world / "sft.jsonl", raw)), str(world), "conversation")


def test_items_follow_the_contract(world, processor):
    dataset = make_dataset(conversation_records(world), processor)
    assert len(dataset) == 3 and dataset.ids == ["two", "text", "one"]
    item = dataset[0]
    assert set(item) == {"id", "input_ids", "labels", "pixel_values", "image_sizes"} and item["id"] == "two"
    assert item["input_ids"].dtype == torch.long and item["input_ids"].shape == item["labels"].shape
    assert item["pixel_values"].shape == (2, 3, 32, 32) and item["pixel_values"].dtype == torch.float32
    assert item["image_sizes"].tolist() == [[24, 40], [32, 16]]
    assert int((item["input_ids"] == IMAGE_ID).sum()) == 3 * 5 + 4 * 2
    reference = processor(images=[Image.new("RGB", (40, 24), (200, 30, 30))], return_tensors="pt")
    torch.testing.assert_close(item["pixel_values"][0], reference["pixel_values"][0])
    assert torch.all(item["pixel_values"][1, 2] > item["pixel_values"][1, 0])  # blue image: B channel > R
    spans = supervised_spans(item["input_ids"].tolist(), item["labels"].tolist())
    assert [tiny_tokenizer().decode(span) for span in spans] == ["No.<|im_end|>"]
    text_only = dataset[1]
    assert set(text_only) == {"id", "input_ids", "labels"} and IMAGE_ID not in text_only["input_ids"].tolist()
    prepended = dataset[2]  # "<image>\n" was prepended to the human turn
    assert prepended["input_ids"].tolist().count(IMAGE_ID) == 15


def test_plain_template_dataset(world, processor):
    raw = [conv("cap", ["images/wide.png"], "<image>\nDescribe.", "A red rectangle.")]
    records = load_records(str(write_jsonl(world / "pre.jsonl", raw)), str(world), "conversation")
    item = make_dataset(records, processor, template="plain")[0]
    ids = item["input_ids"].tolist()
    assert ids[:15] == [IMAGE_ID] * 15 and IMAGE_ID not in ids[15:]
    assert item["labels"].tolist()[:15] == [IGNORE] * 15
    assert tiny_tokenizer().decode(ids[15:]) == "A red rectangle.\n"


def preference_records(world) -> list[PreferenceRecord]:
    raw = [
        {
            "id": "p0",
            "image": "images/wide.png",
            "prompt": "<image>\nColour?",
            "chosen": "Red.",
            "rejected": "Blue, clearly.",
        },
        {"id": "p1", "prompt": "Two plus two?", "chosen": "Four.", "rejected": "Five."},
    ]
    return load_records(str(write_jsonl(world / "dpo.jsonl", raw)), str(world), "preference")


def test_preference_items_and_collation(world, processor):
    dataset = make_dataset(preference_records(world), processor)
    item = dataset[0]
    assert {"rejected_input_ids", "rejected_labels", "pixel_values"} <= set(item)
    assert item["pixel_values"].shape[0] == 1  # one copy of the images per pair
    n_prompt = int((item["labels"] == IGNORE).sum()) - 1  # all but the trailing "\n" are prompt tokens
    assert torch.equal(item["input_ids"][:n_prompt], item["rejected_input_ids"][:n_prompt])
    batch = DataCollator(pad_token_id=tiny_tokenizer().pad_token_id)([dataset[0], dataset[1]])
    length = max(len(dataset[i][key]) for i in range(2) for key in ("input_ids", "rejected_input_ids"))
    for key in (
        "input_ids",
        "labels",
        "attention_mask",
        "rejected_input_ids",
        "rejected_labels",
        "rejected_attention_mask",
    ):
        assert batch[key].shape == (2, length)  # chosen and rejected padded to one length
    assert batch["rejected_attention_mask"].sum(1).tolist() == [
        len(dataset[i]["rejected_input_ids"]) for i in range(2)
    ]
    assert batch["pixel_values"].shape == (1, 3, 32, 32) and batch["image_sizes"].tolist() == [[24, 40]]
    assert batch["sample_ids"] == ["p0", "p1"]


def test_collator_mixed_batch(world, processor):
    dataset = make_dataset(conversation_records(world), processor)
    items = [dataset[1], dataset[0], dataset[2]]  # text-only first
    batch = DataCollator(pad_token_id=0)(items)
    lengths = [len(item["input_ids"]) for item in items]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        assert torch.equal(batch["input_ids"][row, :n], item["input_ids"])
        assert torch.equal(batch["labels"][row, :n], item["labels"])
        assert batch["input_ids"][row, n:].eq(0).all() and batch["labels"][row, n:].eq(IGNORE).all()
    assert batch["pixel_values"].shape == (3, 3, 32, 32)
    assert torch.equal(
        batch["pixel_values"], torch.cat([dataset[0]["pixel_values"], dataset[2]["pixel_values"]])
    )
    assert batch["image_sizes"].tolist() == [[24, 40], [32, 16], [24, 40]]
    assert batch["sample_ids"] == ["text", "two", "one"]
    assert "rejected_input_ids" not in batch
    text_batch = DataCollator(pad_token_id=0)([dataset[1]])
    assert "pixel_values" not in text_batch and "image_sizes" not in text_batch


def test_collator_with_dataloader(world, processor):
    dataset = make_dataset(conversation_records(world), processor)
    loader = DataLoader(dataset, batch_size=2, shuffle=False, collate_fn=DataCollator(pad_token_id=0))
    batches = list(loader)
    assert [b["sample_ids"] for b in batches] == [["two", "text"], ["one"]]
    assert [b["pixel_values"].shape[0] for b in batches] == [2, 1]


def test_collator_rejects_mixed_kinds_and_pads_anyres(world, processor):
    conversation = make_dataset(conversation_records(world), processor)[1]
    preference = make_dataset(preference_records(world), processor)[1]
    with pytest.raises(ValueError, match="mixes preference and conversation"):
        DataCollator(pad_token_id=0)([conversation, preference])
    small, large = torch.ones(1, 2, 3, 4, 4), torch.full((2, 5, 3, 4, 4), 2.0)
    items = [
        {
            "id": i,
            "input_ids": torch.tensor([1]),
            "labels": torch.tensor([1]),
            "pixel_values": p,
            "image_sizes": torch.ones(len(p), 2),
        }
        for i, p in enumerate((small, large))
    ]
    pixel_values = DataCollator(pad_token_id=0)(items)["pixel_values"]
    assert pixel_values.shape == (3, 5, 3, 4, 4)
    assert (
        pixel_values[0, :2].eq(1).all() and pixel_values[0, 2:].eq(0).all() and pixel_values[1:].eq(2).all()
    )


def test_validate_reports_every_bad_record(world, processor):
    long_reply = " ".join(["red circle"] * 40)
    raw = [
        conv("ok", ["images/wide.png"], "<image>\nQ?", "A."),
        conv("missing", ["images/nope.png"], "<image>\nQ?", "A."),
        conv("garbage", ["images/garbage.png"], "<image>\nQ?", "A."),
        conv("long", ["images/tall.png"], "<image>\nQ?", long_reply),
        conv("fine_text", [], "Q?", "A."),
    ]
    records = load_records(str(write_jsonl(world / "mixed.jsonl", raw)), str(world), "conversation")
    dataset = make_dataset(records, processor, max_length=60)
    errors = dataset.validate()
    assert [(type(e), e.record_id) for e in errors] == [
        (MissingImageError, "missing"),
        (UnreadableImageError, "garbage"),
        (SequenceTooLongError, "long"),
    ]
    assert all(str(world / "mixed.jsonl") in str(e) for e in errors)
    with pytest.raises(MissingImageError, match="nope.png"):
        dataset[1]


def test_validate_catches_records_built_in_code(processor, world):
    image = str(world / "images" / "wide.png")
    records = [
        ConversationRecord("empty", [], [("Q", " ")], "code"),
        ConversationRecord("mismatch", [image], [("<image><image>Q", "A")], "code"),
        PreferenceRecord("pref_ok", [image], "<image>\nQ", "A", "B", {}, "code"),
    ]
    errors = make_dataset(records, processor).validate()
    assert [(type(e), e.record_id, e.path) for e in errors] == [
        (EmptyResponseError, "empty", "code"),
        (ImageTokenMismatchError, "mismatch", "code"),
    ]


def test_validate_reads_image_headers_once_per_path_without_decoding(world, processor, monkeypatch):
    import PIL.Image

    raw = [conv(f"r{i}", ["images/wide.png", "images/tall.png"], "<image><image>Q?", "A.") for i in range(6)]
    raw += [
        conv("missing_a", ["images/nope.png"], "Q?", "A."),
        conv("missing_b", ["images/nope.png"], "Q?", "A."),
    ]
    records = load_records(str(write_jsonl(world / "shared.jsonl", raw)), str(world), "conversation")
    opened: list[str] = []
    real_open = PIL.Image.open

    def counting_open(path, *args, **kwargs):
        opened.append(str(path))
        return real_open(path, *args, **kwargs)

    def no_decoding(self, *args, **kwargs):
        raise AssertionError("validate() decoded pixel data")

    monkeypatch.setattr(PIL.Image, "open", counting_open)
    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(PIL.Image.Image, "load", no_decoding)
    errors = make_dataset(records, processor, max_length=60).validate()
    assert sorted(opened) == sorted({str(world / "images" / n) for n in ("wide.png", "tall.png")})
    # Each record sharing a bad file gets its own error; the sizes come from the headers (3*5 + 4*2 tokens).
    assert [(type(e), e.record_id) for e in errors] == [
        (MissingImageError, "missing_a"),
        (MissingImageError, "missing_b"),
    ]
    assert all("nope.png" in e.reason and e.path == str(world / "shared.jsonl") for e in errors)
    (too_long,) = make_dataset(records[:1], processor, max_length=30).validate()
    assert isinstance(too_long, SequenceTooLongError) and "(23 of them image tokens)" in too_long.reason


def test_image_corrupt_after_its_header_fails_when_loaded(world, processor):
    import numpy as np

    path = world / "images" / "truncated.png"
    pixels = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    path.write_bytes(path.read_bytes()[:2000])  # the header survives, the pixel data does not
    raw = [
        conv("ok", ["images/wide.png"], "<image>\nQ?", "A."),
        conv("broken", ["images/truncated.png"], "Q?", "A."),
    ]
    data_file = str(write_jsonl(world / "corrupt.jsonl", raw))
    dataset = make_dataset(load_records(data_file, str(world), "conversation"), processor)
    assert dataset.validate() == []  # a header-level check cannot see it
    dataset[0]
    with pytest.raises(UnreadableImageError) as error:
        dataset[1]
    assert error.value.record_id == "broken" and error.value.path == data_file
    assert str(path) in str(error.value) and "'broken'" in str(error.value)
