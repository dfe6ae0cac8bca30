"""Chat templates: how (human, gpt) exchanges become text pieces, each marked supervised or not.

Follows LLaVA-NeXT's conversation templates (DESIGN §2, §4):

- `qwen_1_5` (Stages 1b, 2, 3b): ChatML with the default Qwen system prompt,
  `<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n{human}<|im_end|>\\n`
  `<|im_start|>assistant\\n{reply}<|im_end|>\\n` per exchange. Supervised: `{reply}<|im_end|>`.
- `plain` (Stage 1a projector pretraining, LLaVA's `preprocess_plain`): no system prompt, no roles; the
  human turn is reduced to its `<image>` placeholders (its text is dropped) and the reply follows
  directly, ended with `"\\n"`. Supervised: `{reply}\\n`. Exactly one exchange per record.

A template is a frozen `ChatTemplate`; `CHAT_TEMPLATES` is the registry (adding one is one entry).
`<image>` placeholders stay in the text pieces; `llava.data.tokenization` expands them to visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

IMAGE_PLACEHOLDER = "<image>"


class Segment(NamedTuple):
    """A piece of the rendered conversation; `supervised` pieces are the ones the loss sees."""

    text: str
    supervised: bool


@dataclass(frozen=True)
class ChatTemplate:
    """A conversation format: fixed texts around each human turn and each reply."""

    name: str
    system: str = ""  # unsupervised text at the very start
    user_prefix: str = ""  # unsupervised, before each human turn
    user_suffix: str = ""  # unsupervised, after each human turn (ends with the assistant header)
    reply_suffix: str = ""  # supervised end-of-turn text right after each reply
    turn_separator: str = ""  # unsupervised text after each reply_suffix
    keep_user_text: bool = True  # False: the human turn is reduced to its <image> placeholders
    max_turns: int | None = None  # exchanges per record allowed by the template; None = any

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("ChatTemplate.name must be non-empty")
        if self.max_turns is not None and self.max_turns < 1:
            raise ValueError(
                f"ChatTemplate {self.name!r}: max_turns must be >= 1 or None, got {self.max_turns}"
            )
        if not self.reply_suffix:
            raise ValueError(
                f"ChatTemplate {self.name!r}: reply_suffix (the supervised end of a reply) is required"
            )

    def human_text(self, text: str) -> str:
        """The human turn as the template shows it (only placeholders when `keep_user_text` is False)."""
        return text if self.keep_user_text else IMAGE_PLACEHOLDER * text.count(IMAGE_PLACEHOLDER)

    def prompt_segments(self, human: str, first: bool) -> list[Segment]:
        """Unsupervised pieces up to the start of the reply (system prompt only for the first turn)."""
        texts = [self.system if first else "", self.user_prefix, self.human_text(human), self.user_suffix]
        return [Segment(text, False) for text in texts if text]

    def reply_segments(self, reply: str) -> list[Segment]:
        """The reply and its end-of-turn text (supervised) and the separator after them (unsupervised)."""
        pieces = [Segment(reply, True), Segment(self.reply_suffix, True), Segment(self.turn_separator, False)]
        return [piece for piece in pieces if piece.text]

    def segments(self, turns: list[tuple[str, str]]) -> list[Segment]:
        """All pieces of a conversation, in order."""
        pieces: list[Segment] = []
        for position, (human, reply) in enumerate(turns):
            pieces += self.prompt_segments(human, first=position == 0)
            pieces += self.reply_segments(reply)
        return pieces

    def render(self, turns: list[tuple[str, str]]) -> str:
        """The full conversation text (placeholders not expanded)."""
        return "".join(piece.text for piece in self.segments(turns))

    def render_prompt(self, human: str) -> str:
        """The text a model continues to answer `human` (single-turn generation prompt)."""
        return "".join(piece.text for piece in self.prompt_segments(human, first=True))


CHAT_TEMPLATES: dict[str, ChatTemplate] = {
    "qwen_1_5": ChatTemplate(
        name="qwen_1_5",
        system="<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>\n<|im_start|>assistant\n",
        reply_suffix="<|im_end|>",
        turn_separator="\n",
    ),
    "plain": ChatTemplate(name="plain", reply_suffix="\n", keep_user_text=False, max_turns=1),
}


def get_template(name: str) -> ChatTemplate:
    """Look a template up by name with an actionable error."""
    if name not in CHAT_TEMPLATES:
        raise KeyError(f"unknown chat template {name!r}; registered: {sorted(CHAT_TEMPLATES)}")
    return CHAT_TEMPLATES[name]
