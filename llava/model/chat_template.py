"""The chat template every checkpoint carries: the `qwen_1_5` training format as Jinja.

Training builds prompts with `llava.data.templates` (`qwen_1_5`: ChatML with the system prompt
"You are a helpful assistant.", DESIGN §2). Qwen2.5-Instruct's own template differs: without a system
message it injects "You are Qwen, created by Alibaba Cloud. You are a helpful assistant." and it cannot
render image parts. `set_training_chat_template` replaces it before a tokenizer is used or saved, so
`tokenizer.apply_chat_template` at inference renders exactly the tokens the model was trained on.

The template: ChatML; the default system prompt when the first message is not a system message;
LLaVA-style content lists where image parts render as "<image>\\n" before the text (the records'
"<image>\\n<question>" convention); `add_generation_prompt` appends the assistant header. No whitespace
between tags, so no Jinja whitespace control is needed.
"""

from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

QWEN_1_5_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}{{ '<image>\\n' }}{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def set_training_chat_template(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """Give `tokenizer` the `qwen_1_5` chat template (in place; logged when it replaces another one)."""
    if tokenizer.chat_template != QWEN_1_5_CHAT_TEMPLATE:
        if tokenizer.chat_template:
            logger.info("Replacing the tokenizer's chat template with the qwen_1_5 training format.")
        tokenizer.chat_template = QWEN_1_5_CHAT_TEMPLATE
    return tokenizer
