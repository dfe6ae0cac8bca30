"""Offline tiny tokenizer: a Qwen2.5-like byte-level BPE trained locally and deterministically.

The paper's LLMs (Qwen2.5-Instruct, DESIGN §2) cannot be downloaded here, so the tiny preset trains a
byte-level BPE with the `tokenizers` library on a corpus generated in code (English words, digits,
punctuation and the colour / shape / position / counting vocabulary of the synthetic world). It copies
what matters from Qwen2.5's tokenizer:

- the Qwen2 pre-tokenizer (NFC, Qwen's split regex with single digits, byte-level without prefix space),
  byte-level decoding and no BOS/EOS added by `encode`;
- special tokens `<|endoftext|>` (pad), `<|im_start|>`, `<|im_end|>` (eos) and LLaVA's `<image>`
  placeholder (exposed as `tokenizer.image_token` / `tokenizer.image_token_id`, which transformers'
  Llava processors read);
- `model_max_length` 2048, right padding, and the `qwen_1_5` training format as `chat_template`
  (`llava.model.chat_template`, the one every checkpoint carries).

Special tokens take ids 0..3 in the order of `SPECIAL_TOKENS`. Training is deterministic: the same call
returns the same vocabulary and merges in every process. If the corpus runs out of merges the vocabulary
is smaller than `vocab_size`; size the LLM embedding with `len(tokenizer)`.
"""

from __future__ import annotations

import itertools

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llava.model.chat_template import QWEN_1_5_CHAT_TEMPLATE

PAD_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START_TOKEN, IM_END_TOKEN, IMAGE_TOKEN)
MODEL_MAX_LENGTH = 2048

QWEN2_PRETOKENIZE_REGEX = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "grey", "pink", "brown")
SHAPES = ("circle", "square", "triangle", "star", "rectangle", "diamond", "cross", "ring")
POSITIONS = ("left", "right", "above", "below", "top", "bottom", "center", "middle", "next to", "near")
SIZES = ("small", "large", "big", "tiny")
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
COMMON_TEXT = (
    "the a an is are was were there this that these those it its of in on at to from with and or but "
    "not no yes what which where who how many much why when image picture photo scene shows contains "
    "describe answer question colour color shape object objects count number total left right side "
    "please look carefully step first then finally because so therefore I you we they see can could "
    "would should be been has have had do does did one more than less most least same different all "
    "each every both only also very background foreground region area box pixel point line edge "
    "corner system user assistant helpful You are a helpful assistant think reason review option "
    "options choose correct incorrect true false best following given based about into over under "
    "between behind front inside outside around along across through during before after while until "
    "again once twice half quarter double triple single pair group row column grid pattern texture "
    "surface light dark bright shadow stripe striped dotted solid empty full open closed round flat "
    "sharp smooth rough tall short long wide narrow thick thin heavy empty visible hidden partially "
    "completely mostly clearly likely"
)
OBJECT_TEXT = (
    "cat dog bird horse cow sheep elephant bear zebra giraffe person man woman child people car bus "
    "truck bicycle motorcycle airplane boat train road street building house window door wall floor "
    "table chair sofa bed lamp clock book cup bottle bowl plate fork knife spoon banana apple orange "
    "sandwich pizza cake flower tree grass sky cloud water river mountain beach sand snow field "
    "garden kitchen room office computer keyboard phone screen television sign chart graph table "
    "diagram map text letter word title label legend axis value percent year month price score team "
    "player ball"
)
VERB_TEXT = (
    "sitting standing walking running holding eating looking playing riding lying flying swimming "
    "parked placed shown drawn painted written labeled located positioned arranged stacked scattered "
    "increase decrease compare measure estimate calculate determine identify recognize observe notice"
)
QUESTION_TEMPLATES = (
    "How many {shape}s are there in the image?",
    "What colour is the {shape}?",
    "What color is the {size} {shape}?",
    "Is the {colour} {shape} {position} the {other}?",
    "Which shape is {position} the {colour} {other}?",
    "Where is the {colour} {shape}?",
    "Describe the image.",
    "Count the {colour} objects.",
)
ANSWER_TEMPLATES = (
    "There are {count} {shape}s.",
    "The {shape} is {colour}.",
    "Yes, the {colour} {shape} is {position} the {other}.",
    "No. The {shape} is not {colour}.",
    "A {size} {colour} {shape} {position} a {other}.",
    "The answer is {digit}.",
    "Answer: ({letter}) {colour}",
)


def tiny_corpus() -> list[str]:
    """Return the built-in training corpus: about a thousand short lines, generated without randomness."""
    lines: list[str] = [COMMON_TEXT, " ".join(NUMBER_WORDS), "0 1 2 3 4 5 6 7 8 9 10 42 100 2025"]
    lines.append("! ? . , ; : ' \" ( ) [ ] { } < > / \\ - + = * & % $ # @ _ | ~ ^ `")
    lines.extend(["system", "You are a helpful assistant.", "user", "assistant"])
    objects = OBJECT_TEXT.split()
    for i, (obj, verb) in enumerate(itertools.product(objects, VERB_TEXT.split())):
        if i % 7 == 0:
            colour = COLOURS[i % len(COLOURS)]
            position = POSITIONS[i % len(POSITIONS)]
            lines.append(f"A {colour} {obj} {verb} {position} the {objects[(i * 5) % len(objects)]}.")
    for a, b in itertools.product(range(0, 20, 3), range(1, 12, 4)):
        lines.append(f"{a} + {b} = {a + b}; {a} x {b} = {a * b}; {a}/{b} = {a / b:.2f}")
    combos = itertools.product(COLOURS, SHAPES, POSITIONS)
    for i, (colour, shape, position) in enumerate(combos):
        fields = {
            "colour": colour,
            "shape": shape,
            "position": position,
            "other": SHAPES[(i + 3) % len(SHAPES)],
            "size": SIZES[i % len(SIZES)],
            "count": NUMBER_WORDS[i % len(NUMBER_WORDS)],
            "digit": str(i % 10),
            "letter": "ABCD"[i % 4],
        }
        if i % 3 == 0:
            lines.append(QUESTION_TEMPLATES[i % len(QUESTION_TEMPLATES)].format(**fields))
            lines.append(ANSWER_TEMPLATES[i % len(ANSWER_TEMPLATES)].format(**fields))
    return lines


def train_tiny_bpe(vocab_size: int = 1024) -> Tokenizer:
    """Train the byte-level BPE (`tokenizers` only, no transformers) on `tiny_corpus()`."""
    min_size = 256 + len(SPECIAL_TOKENS)
    if vocab_size < min_size:
        raise ValueError(
            f"vocab_size must be >= {min_size} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=1,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(), trainer=trainer)
    return tokenizer


def build_tiny_tokenizer(vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Build the Qwen2.5-like tiny tokenizer; `save_pretrained` + `AutoTokenizer.from_pretrained` round-trip."""
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=train_tiny_bpe(vocab_size),
        pad_token=PAD_TOKEN,
        eos_token=IM_END_TOKEN,
        unk_token=None,
        bos_token=None,
        extra_special_tokens={"image_token": IMAGE_TOKEN, "im_start_token": IM_START_TOKEN},
        model_max_length=MODEL_MAX_LENGTH,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = QWEN_1_5_CHAT_TEMPLATE
    return tokenizer
