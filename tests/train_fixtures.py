"""Shared fixtures and helpers for the Stage-2 trainer tests (llava/train).

`train_data` (session scope) writes one small synthetic world, converts its MMPR annotations with
the real converter (`llava.data.mmpr`) into a DPO json and an SFT json that share ids, and keeps
`NUM_SAMPLES` pairs whose chosen replies are at most `MAX_WORDS` words (short, but of mixed lengths,
so token-count normalisation is exercised). Helpers build `python -m llava.train.train` argument
lists, run the entry point in-process, and build a `PivotTrainer` directly when a test needs the
model before training.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

NUM_SAMPLES = 12
MAX_WORDS = 45


@dataclass(frozen=True)
class TrainData:
    """Paths of the tiny model presets and the Stage-2 jsons (ids shared by both files)."""

    world: Path
    llm: Path
    vision_tower: Path
    dpo_json: Path
    sft_json: Path
    ids: tuple[str, ...]

    def records(self, kind: str = "dpo") -> list[dict]:
        return json.loads((self.dpo_json if kind == "dpo" else self.sft_json).read_text())

    def subset(self, n: int, out_dir: Path) -> TrainData:
        """The same data restricted to its first `n` pairs (both jsons written under `out_dir`)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        dpo_json, sft_json = out_dir / "dpo.json", out_dir / "sft.json"
        dpo_json.write_text(json.dumps(self.records("dpo")[:n]))
        sft_json.write_text(json.dumps(self.records("sft")[:n]))
        return TrainData(self.world, self.llm, self.vision_tower, dpo_json, sft_json, self.ids[:n])


_WORLDS: dict[str, TrainData] = {}


@pytest.fixture(scope="session")
def train_data(tiny_dir, tmp_path_factory) -> TrainData:
    """The Stage-2 jsons; built once per session even though each test module re-exports the fixture."""
    if str(tiny_dir) not in _WORLDS:
        _WORLDS[str(tiny_dir)] = write_train_data(tiny_dir, tmp_path_factory.mktemp("train_world"))
    return _WORLDS[str(tiny_dir)]


def write_train_data(tiny_dir: Path, root: Path) -> TrainData:
    from llava.data.mmpr import MMPRConfig, convert_mmpr, write_conversion
    from llava.data.synthetic import generate_world

    world = root / "world"
    generate_world(world, seed=0, num_train=12, num_val=2, image_size=32)
    conversion = convert_mmpr(
        MMPRConfig(
            meta_path=str(world / "mmpr" / "meta.json"),
            size=24,
            tokenizer=str(tiny_dir / "llm"),
            image_folder=str(world),
            allow_fewer=True,
        )
    )
    paths = write_conversion(conversion, root / "full_dpo.json", root / "full_sft.json")
    dpo = json.loads(Path(paths["dpo"]).read_text())
    sft = {r["id"]: r for r in json.loads(Path(paths["sft"]).read_text())}
    keep = [r for r in dpo if len(r["chosen"].split()) <= MAX_WORDS][:NUM_SAMPLES]
    assert len(keep) == NUM_SAMPLES, "the synthetic world yields too few short MMPR pairs"
    assert len({len(r["chosen"].split()) for r in keep}) > 2, "want chosen replies of mixed lengths"
    dpo_json, sft_json = root / "dpo.json", root / "sft.json"
    dpo_json.write_text(json.dumps(keep))
    sft_json.write_text(json.dumps([sft[r["id"]] for r in keep]))
    return TrainData(
        world, tiny_dir / "llm", tiny_dir / "siglip", dpo_json, sft_json, tuple(r["id"] for r in keep)
    )


def train_argv(data: TrainData, output_dir: Path, loss_type: str = "dpo", **flags: object) -> list[str]:
    """Arguments of `python -m llava.train.train` for a short CPU run; `flags` override the defaults."""
    settings: dict[str, object] = {
        "llm": data.llm,
        "vision_tower": data.vision_tower,
        "data_path": data.sft_json if loss_type == "sft" else data.dpo_json,
        "image_folder": data.world,
        "output_dir": output_dir,
        "loss_type": loss_type,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "seed": 0,
    }
    settings.update(flags)
    argv = [f"--{name}={value}" for name, value in settings.items()]
    return [*argv, "--use_cpu"]


def run_main(argv: list[str]):
    """Run the training entry point in-process; returns the `PivotTrainer`."""
    from llava.train.train import main

    return main(argv)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of every parameter, by name."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def build_components(data: TrainData, kind: str = "dpo", mm_tunable_parts: str | None = None):
    """(model, tokenizer, dataset, collator) built the way the entry point builds them."""
    import transformers

    from llava.data.collator import DataCollator
    from llava.data.dataset import MultimodalDataset
    from llava.data.mixture import load_records
    from llava.model.builder import ModelConfig, build_model
    from llava.model.image_tokens import image_token_counter
    from llava.train.param_groups import TUNABLE_PARTS, parse_tunable_parts, set_trainable_parts

    transformers.set_seed(0)
    model, tokenizer, image_processor = build_model(
        ModelConfig(llm=str(data.llm), vision_tower=str(data.vision_tower))
    )
    set_trainable_parts(model, parse_tunable_parts(mm_tunable_parts or ",".join(TUNABLE_PARTS)))
    path = data.dpo_json if kind == "dpo" else data.sft_json
    records = load_records(str(path), str(data.world), "preference" if kind == "dpo" else "conversation")
    dataset = MultimodalDataset(
        records, tokenizer, image_processor, "qwen_1_5", image_token_counter(model.config), 2048
    )
    return model, tokenizer, dataset, DataCollator(tokenizer.pad_token_id)


def make_trainer(
    data: TrainData,
    output_dir: Path,
    mm_tunable_parts: str | None = None,
    deepspeed: dict | str | None = None,
    **args: object,
):
    """A `PivotTrainer` built directly (no training started); preference losses use a live reference.

    `deepspeed` is attached after `TrainingArguments` validation (which imports DeepSpeed, absent on
    CPU), so the trainer's own check of the config can be exercised.
    """
    from llava.train.args import PivotTrainingArguments
    from llava.train.trainer import PivotTrainer

    loss_type = str(args.get("loss_type", "dpo"))
    model, tokenizer, dataset, collator = build_components(
        data, "sft" if loss_type == "sft" else "dpo", mm_tunable_parts
    )
    settings: dict[str, object] = {
        "output_dir": str(output_dir),
        "loss_type": loss_type,
        "reference": "none" if loss_type == "sft" else "live",
        "per_device_train_batch_size": 2,
        "max_steps": 2,
        "learning_rate": 1e-3,
        "logging_steps": 1,
        "save_strategy": "no",
        "report_to": "none",
        "disable_tqdm": True,
        "use_cpu": True,
        "seed": 0,
    }
    if mm_tunable_parts:
        settings["mm_tunable_parts"] = mm_tunable_parts
    settings.update(args)
    train_args = PivotTrainingArguments(**settings)
    train_args.deepspeed = deepspeed
    return PivotTrainer(
        model=model,
        args=train_args,
        train_dataset=dataset,
        data_collator=collator,
        processing_class=tokenizer,
    )
