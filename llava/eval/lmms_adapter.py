"""lmms-eval model adapter: evaluate pivot checkpoints with `python -m lmms_eval --model pivot`.

Follows DESIGN §5 "Benchmarks" (Cambrian-16 through lmms-eval, greedy decoding) and lmms-eval's
"simple" model API (`lmms_eval.api.model.lmms`, `is_simple = True`). It loads any checkpoint written by
`llava.model.builder.save_model` (square `LlavaForConditionalGeneration` and anyres
`LlavaOnevisionForConditionalGeneration`) and builds prompts exactly as training does:

- the human turn is the task's question with one `<image>` per image in front, as lmms-eval's
  `llava_onevision` model does (`"<image> <image>\\n" + question`; left alone when the question already
  holds `<image>` placeholders), rendered with the `qwen_1_5` chat template (DESIGN §2);
- every template piece is tokenised on its own and each `<image>` becomes `image_token_counter(config)(h, w)`
  image-token ids, as in `llava.data.tokenization`; images go through the checkpoint's image processor
  and are batched by `llava.data.collator.DataCollator`, like training batches.

`generate_until` decodes greedily (`do_sample=False`; a task asking for sampling or beams gets a
warning and greedy decoding) in left-padded batches of `batch_size` requests with the same generation
kwargs, stops at `<|im_end|>`/EOS and at the task's `until` strings (cut from the answer; lmms-eval defaults
`until` to `["\\n\\n"]`; `stop_at_until=false` ignores them like its `llava_onevision`), and uses
the task's `max_new_tokens` or else the adapter's. `loglikelihood` scores a continuation with the
training log-prob path (`llava.train.logps`: images encoded once, features scattered into the
`<image>` positions) and returns `(summed negative log-likelihood of the continuation tokens, is_greedy)`:
lmms-eval ranks multiple-choice answers with `argmin`, so like its own models the adapter returns a loss.

Several GPUs: run under `accelerate launch --num_processes N -m lmms_eval ...`; each process holds a
full copy of the model and lmms-eval splits the requests by rank (data parallel).

The CLI finds the class through the entry point `pivot = llava.eval:lmms_eval_manifest` (group
`lmms_eval.models`, declared in setup.py; see `llava/eval/__init__.py`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from PIL import Image
from tqdm import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from llava.data.collator import DataCollator
from llava.data.templates import IMAGE_PLACEHOLDER, get_template
from llava.data.tokenization import IGNORE_INDEX, image_token_id, tokenize_prompt
from llava.model.builder import load_model
from llava.model.image_tokens import image_token_counter
from llava.model.model_dirs import require_llava_checkpoint
from llava.train.logps import embed_with_images, encode_images

logger = logging.getLogger(__name__)

DTYPE_CHOICES = ("auto", "float32", "bfloat16", "float16")
SAMPLING_KEYS = ("temperature", "do_sample", "num_beams")


def human_turn(context: str, n_images: int, where: str = "request") -> str:
    """The human message: `<image>` placeholders (space-separated) and a newline before the question.

    A question that already holds placeholders is kept as is; their number must match the images.
    """
    found = context.count(IMAGE_PLACEHOLDER)
    if found:
        if found != n_images:
            raise ValueError(
                f"{where}: the question holds {found} {IMAGE_PLACEHOLDER!r} but {n_images} image(s) came with it"
            )
        return context
    if n_images == 0:
        return context
    return " ".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + context


def left_pad(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Move right-padded rows to the right end (left padding, as batched generation needs)."""
    ids = torch.full_like(input_ids, pad_id)
    mask = torch.zeros_like(attention_mask)
    width = input_ids.shape[1]
    for row, length in enumerate(attention_mask.sum(dim=1).tolist()):
        ids[row, width - length :] = input_ids[row, :length]
        mask[row, width - length :] = 1
    return ids, mask


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    """The text before the first occurrence of any stop string."""
    end = min((text.find(stop) for stop in stops if stop and stop in text), default=len(text))
    return text[:end]


def _stop_list(until: Any, where: str) -> list[str]:
    if until is None:
        return []
    if isinstance(until, str):
        return [until]
    if isinstance(until, (list, tuple)) and all(isinstance(stop, str) for stop in until):
        return list(until)
    raise TypeError(
        f"{where}: generation_kwargs['until'] must be a string or a list of strings, got {until!r}"
    )


def _chunks(indices: Sequence[int], size: int) -> Iterator[list[int]]:
    for start in range(0, len(indices), size):
        yield list(indices[start : start + size])


class PivotLlava(lmms):
    """A pivot checkpoint as an lmms-eval "simple" model (see the module docstring).

    Model args (`--model_args key=value,...`): pretrained (checkpoint directory, required), device
    (default: the accelerate process's GPU, else cuda if available, else cpu), dtype (auto = bfloat16
    on GPU, float32 on CPU), batch_size (also `--batch_size`), max_new_tokens (used when a task sets
    none; `--gen_kwargs max_new_tokens=N` overrides the tasks'), template (chat template name),
    attn_implementation (e.g. sdpa, flash_attention_2), stop_at_until (default true; false ignores the
    tasks' `until` strings, as lmms-eval's `llava_onevision` does, and stops at end-of-turn only).
    """

    is_simple = True

    def __init__(
        self,
        pretrained: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 1024,
        template: str = "qwen_1_5",
        attn_implementation: str | None = None,
        stop_at_until: bool = True,
        max_batch_size: int | str | None = None,
    ) -> None:
        super().__init__()
        del max_batch_size  # lmms-eval passes it for batch_size="auto", which this adapter rejects
        if dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype={dtype!r}; choose one of {DTYPE_CHOICES}")
        if str(batch_size).startswith("auto"):
            raise ValueError("batch_size='auto' is not supported by the pivot adapter; pass an integer")
        self.batch_size_per_gpu = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)
        if self.batch_size_per_gpu < 1 or self.max_new_tokens < 1:
            raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
        self.accelerator = Accelerator()
        if self.accelerator.num_processes > 1:
            self._device = self.accelerator.device
            self._rank = self.accelerator.process_index
            self._world_size = self.accelerator.num_processes
        else:
            self._device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if dtype == "auto":
            dtype = "bfloat16" if self._device.type == "cuda" else "float32"
        self.pretrained = pretrained
        require_llava_checkpoint(pretrained, "--model_args pretrained")
        self._model, self._tokenizer, self.image_processor = load_model(
            pretrained, dtype=dtype, attn_implementation=attn_implementation
        )
        self._model.to(self._device).eval()
        self.template = get_template(template)
        self.stop_at_until = bool(stop_at_until)
        self.image_id = image_token_id(self._tokenizer)
        if self.image_id != self._model.config.image_token_id:
            raise ValueError(
                f"{pretrained}: tokenizer's <image> id {self.image_id} != config.image_token_id "
                f"{self._model.config.image_token_id}"
            )
        self.count_image_tokens = image_token_counter(self._model.config)
        self.pad_id = self._tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self._tokenizer.eos_token_id
        self.stop_ids = self._stop_token_ids()
        self.collate = DataCollator(pad_token_id=self.pad_id)
        self._warned_sampling = False

    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self) -> PreTrainedTokenizerBase:
        return self._tokenizer

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_gpu

    @property
    def device(self) -> torch.device:
        return self._device

    def _stop_token_ids(self) -> list[int]:
        """End-of-turn token of the template (`<|im_end|>`), the tokenizer's EOS and the checkpoint's."""
        ids: set[int] = set()
        end_of_turn = self._tokenizer.encode(self.template.reply_suffix, add_special_tokens=False)
        if len(end_of_turn) == 1:
            ids.add(end_of_turn[0])
        if self._tokenizer.eos_token_id is not None:
            ids.add(self._tokenizer.eos_token_id)
        configured = self._model.generation_config.eos_token_id
        ids.update([configured] if isinstance(configured, int) else configured or [])
        if not ids:
            raise ValueError(f"{self.pretrained}: no end-of-turn or EOS token to stop generation at")
        return sorted(ids)

    # ------------------------------------------------------------------ requests → batches

    def _images(self, doc_to_visual: Callable, doc: Any, where: str) -> list[Image.Image]:
        visuals = doc_to_visual(doc) if doc_to_visual is not None else None
        if visuals is None:
            return []
        if not isinstance(visuals, (list, tuple)):
            visuals = [visuals]
        images = []
        for visual in visuals:
            if not isinstance(visual, Image.Image):
                raise TypeError(
                    f"{where}: visual of type {type(visual).__name__}; the pivot adapter reads images only"
                )
            images.append(visual.convert("RGB"))
        return images

    def _item(
        self, context: str, images: list[Image.Image], continuation: list[int], where: str
    ) -> dict[str, Any]:
        """A dataset-style item (CONTRACTS §3): prompt (+ supervised continuation) and its images."""
        counts = [self.count_image_tokens(image.height, image.width) for image in images]
        prompt = tokenize_prompt(
            human_turn(context, len(images), where), self._tokenizer, self.template, counts, record_id=where
        )
        item: dict[str, Any] = {
            "id": where,
            "input_ids": torch.tensor(prompt + continuation, dtype=torch.long),
            "labels": torch.tensor([IGNORE_INDEX] * len(prompt) + continuation, dtype=torch.long),
        }
        if images:
            item["pixel_values"] = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
            item["image_sizes"] = torch.tensor(
                [[image.height, image.width] for image in images], dtype=torch.long
            )
        return item

    def _doc(self, task: str, split: str, doc_id: int) -> Any:
        return self.task_dict[task][split][doc_id]

    def _image_inputs(self, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        if "pixel_values" not in batch:
            return {}
        inputs = {"pixel_values": batch["pixel_values"].to(self._device, self._model.dtype)}
        if self._model.config.model_type == "llava_onevision":
            inputs["image_sizes"] = batch["image_sizes"].to(self._device)
        return inputs

    # ------------------------------------------------------------------ generation

    def _generation_settings(self, gen_kwargs: dict[str, Any], where: str) -> tuple[int, list[str]]:
        asks_sampling = (
            float(gen_kwargs.get("temperature") or 0) > 0
            or bool(gen_kwargs.get("do_sample"))
            or int(gen_kwargs.get("num_beams") or 1) > 1
        )
        if asks_sampling and not self._warned_sampling:
            asked = {key: gen_kwargs[key] for key in SAMPLING_KEYS if key in gen_kwargs}
            logger.warning("%s asks for %s; the pivot adapter decodes greedily (DESIGN §5)", where, asked)
            self._warned_sampling = True
        max_new = int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens)
        stops = _stop_list(gen_kwargs.get("until"), where)
        return max_new, stops if self.stop_at_until else []

    @torch.no_grad()
    def _generate_batch(
        self, items: list[dict[str, Any]], max_new_tokens: int, stops: list[str]
    ) -> list[str]:
        batch = self.collate(items)
        input_ids, attention_mask = left_pad(batch["input_ids"], batch["attention_mask"], self.pad_id)
        # A fresh config: pure greedy, whatever sampling defaults the checkpoint's generation_config holds.
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max_new_tokens,
            use_cache=True,
            eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id,
            stop_strings=stops or None,
        )
        output = self._model.generate(
            input_ids=input_ids.to(self._device),
            attention_mask=attention_mask.to(self._device),
            **self._image_inputs(batch),
            generation_config=config,
            **({"tokenizer": self._tokenizer} if stops else {}),
        )
        new_tokens = output[:, input_ids.shape[1] :]
        texts = self._tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        return [cut_at_stops(text, stops) for text in texts]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        """Greedy answers, in request order; batches share generation kwargs (longest prompts first)."""
        groups: dict[str, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(json.dumps(request.args[1], sort_keys=True, default=str), []).append(index)
        answers: list[str | None] = [None] * len(requests)
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="pivot generate_until")
        for indices in groups.values():
            indices.sort(key=lambda i: -len(requests[i].args[0]))
            for chunk in _chunks(indices, self.batch_size_per_gpu):
                items, where = [], ""
                for i in chunk:
                    context, gen_kwargs, doc_to_visual, doc_id, task, split = requests[i].args
                    where = f"task {task!r} split {split!r} doc {doc_id}"
                    doc = self._doc(task, split, doc_id)
                    items.append(self._item(context, self._images(doc_to_visual, doc, where), [], where))
                max_new_tokens, stops = self._generation_settings(requests[chunk[0]].args[1], where)
                for i, text in zip(chunk, self._generate_batch(items, max_new_tokens, stops)):
                    answers[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args[:2], text)
                progress.update(len(chunk))
        progress.close()
        return [str(answer) for answer in answers]

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError(
            "the pivot adapter answers single-round tasks only (Cambrian-16 needs no more)"
        )

    # ------------------------------------------------------------------ log-likelihood

    @torch.no_grad()
    def _score_batch(self, items: list[dict[str, Any]]) -> list[tuple[float, bool]]:
        batch = self.collate(items)
        input_ids = batch["input_ids"].to(self._device)
        labels = batch["labels"].to(self._device)
        image_inputs = self._image_inputs(batch)
        features = encode_images(
            self._model, image_inputs.get("pixel_values"), image_inputs.get("image_sizes")
        )
        embeds = embed_with_images(self._model, input_ids, features)
        targets = labels[:, 1:]
        valid = targets != IGNORE_INDEX
        columns = valid.any(dim=0).nonzero()[:, 0]  # hidden state t predicts token t + 1
        logits = self._model(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"].to(self._device),
            logits_to_keep=columns,
        ).logits.float()
        kept_targets, kept_valid = targets[:, columns], valid[:, columns]
        token_logps = (
            torch.log_softmax(logits, dim=-1).gather(-1, kept_targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        )
        nll = -(token_logps * kept_valid).sum(dim=1)
        greedy = ((logits.argmax(dim=-1) == kept_targets) | ~kept_valid).all(dim=1)
        return [(float(n), bool(g)) for n, g in zip(nll.tolist(), greedy.tolist())]

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        """(summed NLL of the continuation tokens, whether greedy decoding yields them) per request."""
        scores: list[tuple[float, bool] | None] = [None] * len(requests)
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i].args[0]))
        progress = tqdm(total=len(requests), disable=self.rank != 0, desc="pivot loglikelihood")
        for chunk in _chunks(order, self.batch_size_per_gpu):
            items = []
            for i in chunk:
                context, target, doc_to_visual, doc_id, task, split = requests[i].args
                where = f"task {task!r} split {split!r} doc {doc_id}"
                doc = self._doc(task, split, doc_id)
                continuation = target if isinstance(target, str) else target(doc)
                if not isinstance(continuation, str):
                    raise TypeError(
                        f"{where}: continuation must be a string, got {type(continuation).__name__}"
                    )
                ids = self._tokenizer.encode(continuation, add_special_tokens=False)
                if not ids:
                    raise ValueError(f"{where}: empty continuation {continuation!r}")
                items.append(self._item(context, self._images(doc_to_visual, doc, where), ids, where))
            for i, score in zip(chunk, self._score_batch(items)):
                scores[i] = score
            progress.update(len(chunk))
        progress.close()
        return [score for score in scores if score is not None]  # every slot is filled above
