"""Evaluation of pivot checkpoints on the Cambrian-16 benchmarks through lmms-eval (DESIGN §5).

`llava.eval.lmms_adapter.PivotLlava` is the lmms-eval model (`--model pivot`); `scripts/eval/cambrian16.sh`
runs the 16 benchmarks and `python -m analysis.benchmarks` aggregates them.

lmms-eval finds the model through the entry point group `lmms_eval.models`, declared in setup.py as
`pivot = llava.eval:lmms_eval_manifest`. lmms-eval loads every entry point whenever it starts (even for
`lmms-eval tasks`), so this payload lives here and imports neither torch nor the adapter: lmms-eval
imports the class from its path only when `--model pivot` is asked for.
"""

from __future__ import annotations

from typing import Any

LMMS_EVAL_MODEL_ID = "pivot"
LMMS_EVAL_CLASS_PATH = "llava.eval.lmms_adapter.PivotLlava"


def lmms_eval_manifest() -> Any:
    """The `lmms_eval.models` entry-point payload: `ModelManifest(model_id, simple_class_path)`."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=LMMS_EVAL_MODEL_ID, simple_class_path=LMMS_EVAL_CLASS_PATH)
