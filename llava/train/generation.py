"""Sampling completions for GRPO behind one interface: HF `generate` (default) or vLLM (GPU only).

A backend turns a micro-batch of prompts into `num_generations` completions per prompt, group by
group (the G completions of prompt 0, then of prompt 1, ...), each cut after its first stop token.

`HFGenerationBackend` encodes each prompt's images once (`image_features`, computed by the caller and
reused for scoring), writes them into the left-padded prompt embeddings and calls the model's own
`generate` with `inputs_embeds` and `num_return_sequences=G`, so the G samples of a prompt share one
encoding (HF would otherwise run the vision tower in the prefill of each of the G rows, as TRL does).
The `<image>` token id is suppressed (`suppress_tokens`), so no sampled token can break the
image-token count of a scored sequence. Under DeepSpeed ZeRO-3 the partitioned weights are gathered
for the call (`deepspeed.zero.GatheredParameters`), as TRL's `unwrap_model_for_generation` does.

`VLLMGenerationBackend` is the place of vLLM (colocated or server); it refuses clearly where vLLM or
CUDA is missing, and has no weight sync yet, so it refuses there too.

`GenerationRNG` is the sampling stream: its own torch RNG state per process, seeded from (seed, rank)
so processes sample different completions, swapped in for the duration of each `generate` call (the
training RNG, e.g. dropout, is untouched) and saved in every checkpoint so a resumed run samples
exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from llava.train.logps import embed_with_images, unwrap

RNG_FILE = "generation_rng_{rank}.pth"


@dataclass(frozen=True)
class SamplingConfig:
    """How completions are sampled (flags of the same names in llava.train.args)."""

    num_generations: int = 8
    max_completion_length: int = 256
    temperature: float = 1.0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.num_generations < 2:
            raise ValueError(
                f"num_generations must be ≥ 2 (a group needs a baseline), got {self.num_generations}."
            )
        if self.max_completion_length < 1:
            raise ValueError(f"max_completion_length must be ≥ 1, got {self.max_completion_length}.")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0 (GRPO samples), got {self.temperature}.")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}.")


@dataclass
class Completions:
    """Sampled completions of B prompts × G: token ids [B·G, T] (pad after the stop token) and mask."""

    ids: torch.Tensor
    mask: torch.Tensor

    @property
    def lengths(self) -> torch.Tensor:
        return self.mask.sum(dim=1)


class GenerationBackend(Protocol):
    def generate(
        self,
        model: torch.nn.Module,
        prompt_ids: Sequence[torch.Tensor],
        image_features: torch.Tensor | None,
        sampling: SamplingConfig,
    ) -> Completions: ...


def rank_seed(seed: int, rank: int) -> int:
    """A 63-bit sampling seed per (seed, process rank), independent of PYTHONHASHSEED."""
    digest = hashlib.blake2b(f"grpo-generation\x1f{seed}\x1f{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


class GenerationRNG:
    """The sampling RNG of one process (see module docstring)."""

    def __init__(self, seed: int, rank: int, device: torch.device) -> None:
        self.rank = rank
        self.device = torch.device(device)
        self.seed = rank_seed(seed, rank)
        self.cpu_state = torch.Generator().manual_seed(self.seed).get_state()
        self.cuda_state = None
        if self.device.type == "cuda":
            self.cuda_state = torch.Generator(device=self.device).manual_seed(self.seed).get_state()

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        """Sample from this stream inside the block; the global RNG is restored afterwards."""
        devices = [self.device] if self.cuda_state is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu_state)
            if self.cuda_state is not None:
                torch.cuda.set_rng_state(self.cuda_state, self.device)
            yield
            self.cpu_state = torch.get_rng_state()
            if self.cuda_state is not None:
                self.cuda_state = torch.cuda.get_rng_state(self.device)

    def save(self, folder: str | Path) -> None:
        state = {"seed": self.seed, "cpu": self.cpu_state, "cuda": self.cuda_state}
        torch.save(state, Path(folder) / RNG_FILE.format(rank=self.rank))

    def load(self, folder: str | Path) -> None:
        path = Path(folder) / RNG_FILE.format(rank=self.rank)
        if not path.exists():
            raise FileNotFoundError(
                f"{path} is missing: a GRPO checkpoint holds each process's sampling RNG, so resuming it with "
                "another number of processes (or from a non-GRPO checkpoint) cannot reproduce the run."
            )
        state = torch.load(path, weights_only=True)
        self.seed, self.cpu_state = state["seed"], state["cpu"]
        if self.cuda_state is not None and state["cuda"] is not None:
            self.cuda_state = state["cuda"]


def stop_token_ids(tokenizer, reply_suffix: str) -> list[int]:
    """Token ids that end a completion: the template's end of reply (one token) and the tokenizer's EOS."""
    ids = tokenizer.encode(reply_suffix, add_special_tokens=False)
    stops = ids if len(ids) == 1 else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(tokenizer.eos_token_id)
    if not stops:
        raise ValueError(
            f"no stop token: the reply suffix {reply_suffix!r} is not one token and there is no EOS."
        )
    return stops


def cut_after_stop(ids: torch.Tensor, stops: Sequence[int], pad_id: int) -> Completions:
    """Mask every token after the first stop token of each row (the stop token itself is kept)."""
    is_stop = torch.isin(ids, torch.tensor(list(stops), device=ids.device))
    after = (is_stop.cumsum(dim=1) - is_stop.long()) > 0
    mask = ~after
    return Completions(ids.masked_fill(after, pad_id), mask.long())


@contextlib.contextmanager
def gathered_parameters(model: torch.nn.Module) -> Iterator[None]:
    """Gather ZeRO-3 partitioned parameters for generation; nothing to do otherwise."""
    params = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not params:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params):
        yield


class HFGenerationBackend:
    """`generate` with `inputs_embeds` built from once-encoded images (see module docstring)."""

    def __init__(self, pad_token_id: int, stop_ids: Sequence[int]) -> None:
        self.pad_token_id = pad_token_id
        self.stop_ids = list(stop_ids)

    @torch.no_grad()
    def generate(
        self,
        model: torch.nn.Module,
        prompt_ids: Sequence[torch.Tensor],
        image_features: torch.Tensor | None,
        sampling: SamplingConfig,
    ) -> Completions:
        hf = unwrap(model)
        length = max(len(ids) for ids in prompt_ids)
        device = hf.get_input_embeddings().weight.device
        input_ids = torch.full((len(prompt_ids), length), self.pad_token_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(prompt_ids):  # left padding: every prompt ends where generation starts
            input_ids[row, length - len(ids) :] = ids.to(device)
            attention_mask[row, length - len(ids) :] = 1
        was_training = hf.training
        hf.eval()
        try:
            with gathered_parameters(hf):
                embeds = embed_with_images(hf, input_ids, image_features)
                out = hf.generate(
                    inputs_embeds=embeds,
                    attention_mask=attention_mask,
                    do_sample=True,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    top_k=0,
                    max_new_tokens=sampling.max_completion_length,
                    num_return_sequences=sampling.num_generations,
                    suppress_tokens=[hf.config.image_token_id],
                    eos_token_id=self.stop_ids,
                    pad_token_id=self.pad_token_id,
                    use_cache=True,
                )
        finally:
            hf.train(was_training)
        return cut_after_stop(out, self.stop_ids, self.pad_token_id)


class VLLMGenerationBackend:
    """vLLM generation (colocated or server); see the module docstring for what it refuses."""

    def __init__(self, pad_token_id: int, stop_ids: Sequence[int]) -> None:
        if not torch.cuda.is_available():
            raise RuntimeError(
                "--generation_backend vllm needs CUDA GPUs; use --generation_backend hf on CPU."
            )
        try:
            import vllm  # noqa: F401
        except ImportError as error:
            raise RuntimeError(
                "--generation_backend vllm needs the vllm package (pip install vllm); or use --generation_backend hf."
            ) from error
        raise NotImplementedError(
            "--generation_backend vllm: the weight sync from the trained policy to the vLLM engine is not "
            "implemented yet; use --generation_backend hf (ZeRO-3 gathers the weights for generation)."
        )


BACKENDS = {"hf": HFGenerationBackend, "vllm": VLLMGenerationBackend}
