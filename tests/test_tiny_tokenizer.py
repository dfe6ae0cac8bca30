"""The offline tiny tokenizer: Qwen2.5-like special tokens, determinism, save/load round trip."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import pytest
from data_fixtures import tiny_tokenizer
from transformers import AutoTokenizer

from llava.data.templates import CHAT_TEMPLATES
from llava.model import tiny_tokenizer as tiny_tokenizer_module
from llava.model.tiny_tokenizer import SPECIAL_TOKENS, build_tiny_tokenizer, train_tiny_bpe

SAMPLES = [
    "How many red circles are there in the image?",
    "<|im_start|>user\n<image>\nWhat colour is the triangle?<|im_end|>\n",
    "Ünïcödé ✓ 猫 — tabs\tand  double  spaces\n\n end",
    "12 + 7 = 19",
]


def test_special_tokens_are_qwen_like():
    tok = tiny_tokenizer()
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3]
    assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<|endoftext|>", "<|im_end|>", None)
    assert tok.pad_token_id == 0 and tok.eos_token_id == 2
    assert tok.image_token == "<image>" and tok.image_token_id == 3
    assert tok.model_max_length == 2048 and tok.padding_side == "right"
    assert len(tok) == 1024
    ids = tok("<|im_start|>user<image><|im_end|>")["input_ids"]
    assert ids[0] == 1 and ids[-2:] == [3, 2]  # special tokens are never split, nothing is added


def test_byte_level_round_trip():
    tok = tiny_tokenizer()
    for text in SAMPLES:
        assert tok.decode(tok(text)["input_ids"]) == text


def test_digits_are_single_tokens():
    tok = tiny_tokenizer()
    assert tok.convert_ids_to_tokens(tok("2025")["input_ids"]) == ["2", "0", "2", "5"]


def test_same_call_gives_same_vocab():
    first, second = build_tiny_tokenizer(), build_tiny_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    assert first.backend_tokenizer.to_str() == second.backend_tokenizer.to_str()


def test_training_is_deterministic_across_processes():
    # Load the module file directly so the child process skips llava.model's package imports.
    script = (
        "import hashlib, importlib.util, sys; "
        "spec = importlib.util.spec_from_file_location('tiny_tokenizer', sys.argv[1]); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        "print(hashlib.sha256(module.train_tiny_bpe().to_str().encode()).hexdigest())"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    command = [sys.executable, "-c", script, tiny_tokenizer_module.__file__]
    other = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
    assert other.stdout.strip() == hashlib.sha256(train_tiny_bpe().to_str().encode()).hexdigest()


def test_smaller_vocab_and_minimum():
    assert len(build_tiny_tokenizer(300)) == 300
    with pytest.raises(ValueError, match="vocab_size"):
        build_tiny_tokenizer(100)


def test_save_and_load_round_trip(tmp_path):
    tok = tiny_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.get_vocab() == tok.get_vocab()
    assert (loaded.pad_token_id, loaded.eos_token_id, loaded.image_token_id) == (0, 2, 3)
    assert loaded.model_max_length == 2048 and loaded.padding_side == "right"
    assert loaded.chat_template == tok.chat_template


def test_chat_template_matches_qwen_1_5():
    tok = tiny_tokenizer()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image"}, {"type": "text", "text": "What colour is the star?"}],
        },
        {"role": "assistant", "content": "Yellow."},
        {"role": "user", "content": "And the circle?"},
        {"role": "assistant", "content": "Blue."},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nWhat colour is the star?<|im_end|>\n"
        "<|im_start|>assistant\nYellow.<|im_end|>\n"
        "<|im_start|>user\nAnd the circle?<|im_end|>\n"
        "<|im_start|>assistant\nBlue.<|im_end|>\n"
    )
    assert tok.apply_chat_template(messages, tokenize=False) == expected
    turns = [("<image>\nWhat colour is the star?", "Yellow."), ("And the circle?", "Blue.")]
    assert CHAT_TEMPLATES["qwen_1_5"].render(turns) == expected
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == CHAT_TEMPLATES["qwen_1_5"].render_prompt("<image>\nWhat colour is the star?")
