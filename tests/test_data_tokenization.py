"""Tokenisation with label masks, checked on worked examples written out by hand."""

from __future__ import annotations

import pytest
from data_fixtures import IGNORE, supervised_spans, tiny_tokenizer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from llava.data.errors import (
    EmptyResponseError,
    ImageTokenMismatchError,
    SequenceTooLongError,
    TemplateMismatchError,
)
from llava.data.templates import CHAT_TEMPLATES, ChatTemplate, get_template
from llava.data.tokenization import image_token_id, tokenize_conversation, tokenize_preference

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE_ID = 3  # <image> is special token 3 of the tiny tokenizer


def encode(text: str) -> list[int]:
    return tiny_tokenizer().encode(text, add_special_tokens=False)


def decode_spans(input_ids: list[int], labels: list[int]) -> list[str]:
    return [tiny_tokenizer().decode(span) for span in supervised_spans(input_ids, labels)]


def test_qwen_single_turn_worked_example():
    turns = [("<image>\nHow many red circles are there?", "There are 3 circles.")]
    input_ids, labels = tokenize_conversation(turns, tiny_tokenizer(), "qwen_1_5", [3], 2048)
    prompt = SYSTEM + "<|im_start|>user\n<image><image><image>\nHow many red circles are there?<|im_end|>\n"
    prompt += "<|im_start|>assistant\n"
    reply = "There are 3 circles.<|im_end|>"
    assert input_ids == encode(prompt + reply + "\n")  # the whole text, tokenised in one go
    k, m = len(encode(prompt)), len(encode(reply))
    assert labels == [IGNORE] * k + input_ids[k : k + m] + [IGNORE]  # the final "\n" is not supervised
    assert decode_spans(input_ids, labels) == [reply]
    assert input_ids.count(IMAGE_ID) == 3


def test_qwen_multi_turn_masks_every_reply():
    turns = [("<image>\nWhat colour is the star?", "Yellow."), ("And the circle?", "It is blue.")]
    input_ids, labels = tokenize_conversation(turns, tiny_tokenizer(), CHAT_TEMPLATES["qwen_1_5"], [2], 2048)
    text = (
        SYSTEM + "<|im_start|>user\n<image><image>\nWhat colour is the star?<|im_end|>\n"
        "<|im_start|>assistant\nYellow.<|im_end|>\n<|im_start|>user\nAnd the circle?<|im_end|>\n"
        "<|im_start|>assistant\nIt is blue.<|im_end|>\n"
    )
    assert input_ids == encode(text)
    assert decode_spans(input_ids, labels) == ["Yellow.<|im_end|>", "It is blue.<|im_end|>"]
    im_end = tiny_tokenizer().convert_tokens_to_ids("<|im_end|>")
    newline = encode("\n")[0]
    for position, token in enumerate(input_ids):
        if token == im_end and labels[position] != IGNORE:
            assert input_ids[position + 1] == newline and labels[position + 1] == IGNORE
    assert sum(label != IGNORE for label in labels) == len(encode("Yellow.<|im_end|>It is blue.<|im_end|>"))


def test_plain_template_keeps_only_image_tokens():
    turns = [("<image>\nDescribe the image briefly.", "A red circle.")]
    input_ids, labels = tokenize_conversation(turns, tiny_tokenizer(), "plain", [4], 2048)
    expected = [IMAGE_ID] * 4 + encode("A red circle.") + encode("\n")
    assert input_ids == expected
    assert labels == [IGNORE] * 4 + expected[4:]
    assert decode_spans(input_ids, labels) == ["A red circle.\n"]
    assert CHAT_TEMPLATES["plain"].render(turns) == "<image>A red circle.\n"


def test_plain_template_takes_one_exchange():
    turns = [("<image>\nQ", "A."), ("Q2", "B.")]
    with pytest.raises(TemplateMismatchError, match="at most 1") as info:
        tokenize_conversation(turns, tiny_tokenizer(), "plain", [1], 2048, record_id="r", source="pre.json")
    assert "pre.json" in str(info.value) and "'r'" in str(info.value)


def test_images_expand_in_order():
    turns = [("<image> left, <image> right. Same?", "No.")]
    input_ids, _ = tokenize_conversation(turns, tiny_tokenizer(), "qwen_1_5", [2, 5], 2048)
    head = len(encode(SYSTEM + "<|im_start|>user\n"))
    left = encode(" left, ")
    assert input_ids[head : head + 2] == [IMAGE_ID] * 2
    assert input_ids[head + 2 : head + 2 + len(left)] == left
    start = head + 2 + len(left)
    assert input_ids[start : start + 5] == [IMAGE_ID] * 5 and input_ids[start + 5] != IMAGE_ID


def test_text_only_conversation():
    input_ids, labels = tokenize_conversation([("Say hi.", "Hi!")], tiny_tokenizer(), "qwen_1_5", [], 2048)
    assert IMAGE_ID not in input_ids
    assert decode_spans(input_ids, labels) == ["Hi!<|im_end|>"]


def test_preference_shares_prompt_tokens():
    tok = tiny_tokenizer()
    prompt, chosen, rejected = (
        "<image>\nWhich shape is bigger?",
        "The star.",
        "The circle is bigger than the star.",
    )
    out = tokenize_preference(prompt, chosen, rejected, tok, "qwen_1_5", [2], 2048)
    prompt_text = (
        SYSTEM + "<|im_start|>user\n<image><image>\nWhich shape is bigger?<|im_end|>\n<|im_start|>assistant\n"
    )
    n_prompt = len(encode(prompt_text))
    assert out["input_ids"][:n_prompt] == out["rejected_input_ids"][:n_prompt] == encode(prompt_text)
    assert out["rejected_input_ids"] == encode(prompt_text + rejected + "<|im_end|>\n")
    assert decode_spans(out["input_ids"], out["labels"]) == ["The star.<|im_end|>"]
    assert decode_spans(out["rejected_input_ids"], out["rejected_labels"]) == [rejected + "<|im_end|>"]
    assert all(label == IGNORE for label in out["labels"][:n_prompt] + out["rejected_labels"][:n_prompt])
    conversation = tokenize_conversation([(prompt, chosen)], tok, "qwen_1_5", [2], 2048)
    assert (out["input_ids"], out["labels"]) == conversation


def test_too_long_after_image_expansion():
    tok = tiny_tokenizer()
    turns = [("<image>\nQ?", "A.")]
    n_text = len(tokenize_conversation(turns, tok, "qwen_1_5", [1], 2048)[0]) - 1
    assert len(tokenize_conversation(turns, tok, "qwen_1_5", [100], n_text + 100)[0]) == n_text + 100
    with pytest.raises(SequenceTooLongError, match="100 of them image tokens") as info:
        tokenize_conversation(turns, tok, "qwen_1_5", [100], n_text + 99, record_id="long", source="d.json")
    assert "d.json" in str(info.value) and "'long'" in str(info.value)
    with pytest.raises(SequenceTooLongError, match="prompt\\+rejected"):
        tokenize_preference(
            "<image>\nQ?", "A.", "A much much longer answer.", tok, "qwen_1_5", [100], n_text + 100
        )


@pytest.mark.parametrize(
    ("turns", "counts", "error_type"),
    [
        ([("<image>\n<image>\nQ", "A.")], [576], ImageTokenMismatchError),
        ([("Q", "A.")], [576], ImageTokenMismatchError),
        ([("<image>\nQ", " ")], [576], EmptyResponseError),
        ([("<image>\nQ", "see <image>")], [576], ImageTokenMismatchError),
        ([], [], TemplateMismatchError),
    ],
)
def test_conversation_errors(turns, counts, error_type):
    with pytest.raises(error_type) as info:
        tokenize_conversation(
            turns, tiny_tokenizer(), "qwen_1_5", counts, 2048, record_id="x7", source="s.jsonl"
        )
    assert info.value.path == "s.jsonl" and info.value.record_id == "x7"


def test_preference_errors():
    tok = tiny_tokenizer()
    with pytest.raises(EmptyResponseError, match="'rejected'"):
        tokenize_preference("Q", "A", "", tok, "qwen_1_5", [], 2048)
    with pytest.raises(ImageTokenMismatchError, match="has 2 '<image>'"):
        tokenize_preference("<image><image>Q", "A", "B", tok, "qwen_1_5", [9], 2048)


def test_tokenizer_without_image_token_is_rejected():
    backend = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]")
    with pytest.raises(ValueError, match="add it first"):
        image_token_id(tok)


def test_template_registry_and_validation():
    assert set(CHAT_TEMPLATES) >= {"qwen_1_5", "plain"}
    with pytest.raises(KeyError, match="registered"):
        get_template("vicuna_v1")
    with pytest.raises(ValueError, match="max_turns"):
        ChatTemplate(name="bad", reply_suffix="\n", max_turns=0)
    with pytest.raises(ValueError, match="reply_suffix"):
        ChatTemplate(name="bad")
