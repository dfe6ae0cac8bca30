"""Command-line arguments of `python -m llava.train.train` (LLaVA-NeXT names where they exist).

Three dataclasses parsed by `HfArgumentParser`: what model to start from, what data to read, and how
to train (HF `TrainingArguments` plus the loss, reference and per-module learning-rate options).
Defaults are the paper's Stage-2 DPO recipe where one applies (DESIGN §4).

`PivotTrainingArguments` refuses or flags HF/PIVOT options this trainer would otherwise accept and
ignore (`check_unused_options`), and decides the precision the model is loaded in:
- `--bf16` without DeepSpeed: fp32 weights, bf16 autocast (`weights_dtype`, `autocast_dtype`). HF's
  AdamW updates the parameters in place, so bf16 weights would have no fp32 master copy and most
  updates at Stage-2 learning rates (1e-6..1e-5 on weights ~0.02, below half a bf16 ulp) would round away.
- `--bf16` with DeepSpeed: bf16 weights. The engine casts the module to bf16 itself
  (`DeepSpeedEngine._configure_distributed_model`) and its ZeRO/BF16 optimizers keep fp32 master
  copies of the partitions they update; transformers fills the config's `bf16.enabled` from `--bf16`
  (`integrations/deepspeed.py`, `HfTrainerDeepSpeedConfig.trainer_config_process`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, fields

import torch
import transformers

from llava.model.stage3 import REUSE_CHOICES
from llava.train.generation import BACKENDS
from llava.train.grpo import NORMALISATIONS
from llava.train.losses import LOSS_TYPES, PREFERENCE_LOSSES
from llava.train.param_groups import parse_tunable_parts

logger = logging.getLogger(__name__)

REFERENCE_MODES = ("precomputed", "live", "none")
BCO_DELTAS = ("running", "batch")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Start from this MLLM checkpoint (Stage 1b/2/3). Else build from --llm + --vision_tower."
        },
    )
    llm: str | None = field(default=None, metadata={"help": "LLM preset (qwen2.5-0.5b…7b), hub id or path."})
    vision_tower: str | None = field(
        default=None, metadata={"help": "Vision preset, hub id or path; 'A+B' = ensemble."}
    )
    mm_vision_select_layer: int | None = field(
        default=None,
        metadata={
            "help": "Hidden state of the tower fed to the projector (default: family's, -2 for SigLIP)."
        },
    )
    mm_vision_select_feature: str = field(
        default="patch", metadata={"help": "'patch' (drop CLS/registers) or 'cls_patch'."}
    )
    mm_projector_type: str = field(
        default="mlp2x_gelu", metadata={"help": "Projector type (HF Llava: mlp2x_gelu)."}
    )
    image_aspect_ratio: str = field(
        default="square", metadata={"help": "'square' (paper) or 'anyres_max_9' (OneVision)."}
    )
    pretrain_mm_mlp_adapter: str | None = field(
        default=None,
        metadata={
            "help": "Projector weights (projector/ dir or safetensors file) from a projector-only run."
        },
    )
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "LLM attention: sdpa, eager or flash_attention_2 (default: flash_attention_2 on GPU when flash_attn is installed, else sdpa)."
        },
    )
    stage3_source: str | None = field(
        default=None,
        metadata={
            "help": "Stage 3: Stage-2 checkpoint or exported-encoder dir whose frozen encoder goes under --llm."
        },
    )
    projector_reuse_layers: int = field(
        default=1,
        metadata={
            "help": "Stage 3: frozen Stage-2 projector layers reused (0, 1, 2) before new ones (paper: 1 + 1)."
        },
    )

    def __post_init__(self) -> None:
        if self.projector_reuse_layers not in REUSE_CHOICES:
            raise ValueError(
                f"--projector_reuse_layers {self.projector_reuse_layers}: choose one of {REUSE_CHOICES}."
            )
        if self.stage3_source is None:
            return
        clashes = [
            flag
            for flag, value in (
                ("--model_name_or_path", self.model_name_or_path),
                ("--vision_tower", self.vision_tower),
                ("--pretrain_mm_mlp_adapter", self.pretrain_mm_mlp_adapter),
            )
            if value
        ]
        if clashes:
            raise ValueError(
                f"--stage3_source takes encoder and projector from {self.stage3_source}: drop {clashes}."
            )
        if not self.llm:
            raise ValueError("--stage3_source needs --llm (the new LLM the encoder is transplanted to).")


@dataclass
class DataArguments:
    data_path: str = field(
        default="", metadata={"help": ".json/.jsonl records or a YAML mixture (DESIGN §3)."}
    )
    image_folder: str | None = field(
        default=None, metadata={"help": "Root that relative image paths resolve against."}
    )
    conv_template: str = field(
        default="qwen_1_5", metadata={"help": "Chat template: qwen_1_5 or plain (Stage 1a)."}
    )
    model_max_length: int = field(
        default=2048, metadata={"help": "Max tokens after image expansion; longer is an error."}
    )
    skip_invalid: bool = field(
        default=False,
        metadata={"help": "Skip invalid records (ids and reasons written to skipped_records.jsonl)."},
    )
    data_cache_dir: str | None = field(
        default=None,
        metadata={
            "help": "Record store + validation cache (llava.data.store), on a filesystem every node shares; "
            "default: <HF_DATASETS_CACHE>/pivot_records (set it to a shared path for multi-node runs)."
        },
    )
    data_num_proc: int = field(
        default=1, metadata={"help": "Processes validating the records, once, on the main process."}
    )
    group_by_length: bool = field(
        default=False,
        metadata={
            "help": "Sort samples by length within seeded mega-batches (one optimizer step each; less padding)."
        },
    )
    length_data_path: str | None = field(
        default=None,
        metadata={
            "help": "With --group_by_length: the DPO data whose prompt+longer-reply lengths order this run "
            "(give it to the SFT run of a comparison so both see the same order)."
        },
    )


@dataclass
class PivotTrainingArguments(transformers.TrainingArguments):
    loss_type: str = field(default="dpo", metadata={"help": f"One of {sorted(LOSS_TYPES)}."})
    beta: float = field(
        default=0.1,
        metadata={
            "help": "KL strength β of the preference losses (paper: 0.1); for grpo the k3 KL weight to a "
            "frozen copy of the starting model (0: no reference)."
        },
    )
    dpo_alpha: float = field(default=1.0, metadata={"help": "Weight of the preference loss (PIVOT: 1.0)."})
    gamma: float = field(
        default=0.0, metadata={"help": "Weight of an added SFT term on the chosen response (PIVOT: 0)."}
    )
    mpo_weights: str = field(
        default="0.8,0.2,1.0", metadata={"help": "MPO preference,quality,generation weights."}
    )
    bco_delta: str = field(
        default="running",
        metadata={
            "help": "MPO's BCO reward shift: 'running' (InternVL's MPO: TRL 0.10 RunningMoments mean over "
            "steps and ranks, saved in checkpoints) or 'batch' (the micro-batch's mean reward)."
        },
    )
    reference: str = field(
        default="precomputed",
        metadata={
            "help": "Reference log-probs: 'precomputed' (one pass, cached), 'live' (frozen copy) or 'none' (SFT)."
        },
    )
    ref_logps_path: str | None = field(
        default=None,
        metadata={"help": "Cache of precomputed reference log-probs (default: OUTPUT_DIR/ref_logps.json)."},
    )
    share_image_encoding: bool = field(
        default=True,
        metadata={"help": "Encode each pair's image once for chosen and rejected (off: naive baseline)."},
    )
    mm_tunable_parts: str = field(
        default="mm_vision_tower,mm_mlp_adapter,mm_language_model",
        metadata={"help": "Comma-separated subset of mm_vision_tower, mm_mlp_adapter, mm_language_model."},
    )
    mm_vision_tower_lr: float | None = field(
        default=None, metadata={"help": "Vision tower LR (Stage 1b: 2e-6)."}
    )
    mm_projector_lr: float | None = field(
        default=None, metadata={"help": "Projector LR (default: learning_rate)."}
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh in an OUTPUT_DIR holding another run: its checkpoints, model and caches are "
            "removed (llava.train.run_dir). Without it such a directory resumes only a run of the same settings."
        },
    )
    num_generations: int = field(default=8, metadata={"help": "GRPO: completions sampled per prompt (G)."})
    max_completion_length: int = field(default=256, metadata={"help": "GRPO: max new tokens per completion."})
    temperature: float = field(
        default=1.0, metadata={"help": "GRPO: sampling temperature (also scales logits)."}
    )
    top_p: float = field(default=1.0, metadata={"help": "GRPO: nucleus sampling mass."})
    epsilon: float = field(default=0.2, metadata={"help": "GRPO: lower clip range ε of the ratio."})
    epsilon_high: float | None = field(
        default=None, metadata={"help": "GRPO: upper clip range (DAPO's clip-higher; default: epsilon)."}
    )
    num_iterations: int = field(
        default=1, metadata={"help": "GRPO: optimizer steps per generation batch (μ; 1 = on-policy)."}
    )
    loss_normalization: str = field(
        default="dapo",
        metadata={
            "help": f"GRPO loss normalisation, named by paper: one of {NORMALISATIONS} (llava.train.grpo)."
        },
    )
    scale_rewards: bool | None = field(
        default=None,
        metadata={"help": "GRPO: divide advantages by the group std (default: yes, except for dr_grpo)."},
    )
    reward_funcs: list[str] = field(
        default_factory=lambda: ["exact_match", "format"],
        metadata={
            "help": "GRPO reward functions (llava.train.rewards.REWARDS), summed with --reward_weights."
        },
    )
    reward_weights: list[float] | None = field(
        default=None, metadata={"help": "GRPO: one weight per reward function (default: all 1)."}
    )
    generation_backend: str = field(
        default="hf", metadata={"help": f"GRPO sampling backend: one of {sorted(BACKENDS)}."}
    )
    export_encoder: bool = field(
        default=True,
        metadata={
            "help": "Write vision_encoder/, projector/, export.json into each checkpoint and OUTPUT_DIR."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"--loss_type {self.loss_type!r}: choose one of {sorted(LOSS_TYPES)}.")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"--reference {self.reference!r}: choose one of {REFERENCE_MODES}.")
        if self.loss_type in PREFERENCE_LOSSES and self.reference == "none":
            raise ValueError(
                f"--loss_type {self.loss_type} needs reference log-probs: --reference precomputed or live."
            )
        if self.beta < 0 or (self.beta == 0 and self.loss_type != "grpo"):
            raise ValueError(f"--beta must be > 0 (≥ 0 for grpo), got {self.beta}.")
        if self.loss_type == "grpo":
            self.check_grpo_options()
        parse_tunable_parts(self.mm_tunable_parts)
        weights = [float(w) for w in self.mpo_weights.split(",")]
        if len(weights) != 3:
            raise ValueError(f"--mpo_weights needs three comma-separated numbers, got {self.mpo_weights!r}.")
        if self.bco_delta not in BCO_DELTAS:
            raise ValueError(f"--bco_delta {self.bco_delta!r}: choose one of {BCO_DELTAS}.")
        self.check_unused_options()
        self.remove_unused_columns = False

    def check_grpo_options(self) -> None:
        """Fail fast on GRPO settings the run cannot honour."""
        if self.loss_normalization not in NORMALISATIONS:
            raise ValueError(
                f"--loss_normalization {self.loss_normalization!r}: choose one of {NORMALISATIONS}."
            )
        if self.generation_backend not in BACKENDS:
            raise ValueError(
                f"--generation_backend {self.generation_backend!r}: choose one of {sorted(BACKENDS)}."
            )
        if self.num_iterations < 1:
            raise ValueError(f"--num_iterations must be ≥ 1, got {self.num_iterations}.")
        if self.reward_weights is not None and len(self.reward_weights) != len(self.reward_funcs):
            raise ValueError(
                f"--reward_weights has {len(self.reward_weights)} values for {len(self.reward_funcs)} "
                f"--reward_funcs {self.reward_funcs}."
            )
        if self.eval_strategy != "no":
            raise ValueError(
                f"--eval_strategy {self.eval_strategy} with --loss_type grpo: GRPO has no evaluation loss (its "
                "completions are sampled per training step); evaluate checkpoints with scripts/eval instead."
            )
        if (
            self.num_iterations > 1
            and self.save_strategy == "steps"
            and self.save_steps % self.num_iterations
        ):
            raise ValueError(
                f"--save_steps {self.save_steps} must be a multiple of --num_iterations {self.num_iterations}: a "
                "checkpoint inside one generation batch's reuse could not resume it."
            )

    def check_unused_options(self) -> None:
        """Refuse options that would change nothing but look as if they changed the loss; warn about the
        harmless ones (a launcher may pass one set of flags to every loss type)."""
        if self.label_smoothing_factor:
            raise ValueError(
                f"--label_smoothing_factor {self.label_smoothing_factor} is not supported: every loss of "
                "llava.train.losses computes its own log-probabilities and ignores HF's label smoother. Drop it."
            )
        if self.train_sampling_strategy != "random":  # transformers 5 spells --group_by_length this way
            logger.warning(
                "--train_sampling_strategy %s is ignored: every run draws its samples from MatchedSampler "
                "(llava.train.sampling), so SFT and preference runs see the same samples in the same order; "
                "--group_by_length groups them by a length both runs share.",
                self.train_sampling_strategy,
            )
        loss_options = ("dpo_alpha", "gamma", "beta", "mpo_weights", "bco_delta")
        changed = {
            f.name for f in fields(self) if f.name in loss_options and getattr(self, f.name) != f.default
        }
        if self.loss_type in ("sft", "grpo") and {"dpo_alpha", "gamma"} & changed:
            raise ValueError(
                f"--loss_type {self.loss_type} with --dpo_alpha {self.dpo_alpha} --gamma {self.gamma}: these "
                f"weight the preference loss and the SFT term added to it, and a {self.loss_type} run has "
                "neither. Drop them, or use a preference --loss_type (e.g. dpo with --gamma for DPO + SFT)."
            )
        ignored = ["beta"] if self.loss_type == "sft" and "beta" in changed else []
        ignored += [n for n in ("mpo_weights", "bco_delta") if self.loss_type != "mpo" and n in changed]
        if ignored:
            flags = ", ".join(f"--{name} {getattr(self, name)}" for name in ignored)
            logger.warning("%s: ignored by --loss_type %s (it has no such term).", flags, self.loss_type)

    @property
    def weights_dtype(self) -> str:
        """dtype to build or load the model in: bf16 only under DeepSpeed (see the module docstring)."""
        return "bfloat16" if self.bf16 and self.deepspeed else "float32"

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        """The dtype the Trainer autocasts to (native AMP without DeepSpeed), or None."""
        if self.deepspeed:
            return None
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else None

    @property
    def mpo_weight_tuple(self) -> tuple[float, float, float]:
        a, b, c = (float(w) for w in self.mpo_weights.split(","))
        return a, b, c
