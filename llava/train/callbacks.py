"""Training callbacks: the encoder-export hook (DESIGN §5 "Encoder export", docs/CONTRACTS.md §1).

`EncoderExportCallback` (on by default, `--export_encoder False` turns it off) writes
`vision_encoder/`, `projector/` and `export.json` (llava.export) into each checkpoint
(`OUTPUT_DIR/checkpoint-N/`: `PivotTrainer._save_checkpoint` calls `export` while the checkpoint is still
staged, so it is renamed into place with its export; llava.train.checkpoints), and into `OUTPUT_DIR` when
training ends, so every saved model comes with the encoder exactly as it was used at that step. It also saves
the MLLM's image processor next to the checkpoint's weights (the trainer saves only the tokenizer),
so `llava.model.builder.load_model` opens a `checkpoint-N/` like a final directory. Every process
takes part (under ZeRO-3 the partitioned weights are gathered collectively); only the process that
saves checkpoints (`args.should_save`) writes.
"""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from llava.export import export_model

logger = logging.getLogger(__name__)


class EncoderExportCallback(TrainerCallback):
    """Export the vision encoder + projector at every checkpoint save and at the end of training."""

    def __init__(self, image_processor, loss_type: str) -> None:
        self.image_processor = image_processor
        self.loss_type = loss_type

    def export(
        self, model, target: Path, args: TrainingArguments, state: TrainerState, source: Path | None = None
    ) -> None:
        """Write the export into `target`; `source` is the checkpoint it records (default: `target`)."""
        export_model(
            model,
            self.image_processor,
            target,
            source_checkpoint=source or target,
            global_step=state.global_step,
            loss_type=self.loss_type,
            is_main_process=args.should_save,
        )
        if args.should_save:
            self.image_processor.save_pretrained(str(target))

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, model=None, **kwargs
    ) -> None:
        self.export(model, Path(args.output_dir), args, state)
