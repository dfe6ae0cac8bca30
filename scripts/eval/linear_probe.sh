#!/usr/bin/env bash
# Linear probe (openai/CLIP protocol; DESIGN §5) of a list of exported encoders -> one results table:
# L2 logistic regression with C swept on a validation split of a seeded 50K ImageNet-train subset, refit,
# top-1/top-5 on ImageNet val, plus the prototype classifier; feature points "encoder" and "projector".
# Writes $OUTPUT_DIR/linear_probe.json (docs/CONTRACTS.md §4, kind linear_probe) and linear_probe.md.
#
#   scripts/eval/linear_probe.sh [NAME=]EXPORT_DIR ... [--extra --flags for python -m analysis.linear_probe]
#
# Without encoder arguments the matched SFT and DPO runs of $RUN_BASE are probed. Every variable below
# can be set from the environment (e.g. METHODS="logreg torch_lbfgs prototype", DATA_FORMAT=hf).
#
# Original-encoder baseline: BASELINE_TOWER=siglip2-so16 (preset, hub id or dir) exports the untrained tower
# once, exactly as the MLLM reads it (`python -m llava.export --vision_tower`, no projector), to $BASELINE_DIR
# and probes it as run "$BASELINE_NAME" (scripts/eval/common.sh). Give the trained runs' tower flags in
# BASELINE_EXPORT_ARGS (e.g. "--mm_vision_select_layer -2"; default: the builder's, as the training scripts
# use). Having no projector, it is probed at the encoder feature point only.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python}
LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
VISION_MODEL_VERSION=${VISION_MODEL_VERSION:-siglip2-so16}
RUN_BASE=${RUN_BASE:-${LLM_VERSION}_${VISION_MODEL_VERSION}}
# A GRPO run (scripts/train/grpo.sh) is one more entry: ENCODERS="... grpo=runs/stage2/${RUN_BASE}_grpo/export".
ENCODERS=${ENCODERS:-"sft=runs/stage2/${RUN_BASE}_sft/export dpo=runs/stage2/${RUN_BASE}_dpo/export"}
# ImageFolder roots (<root>/<class>/<image>) or datasets.save_to_disk dirs with DATA_FORMAT=hf.
TRAIN_DATA=${TRAIN_DATA:-data/imagenet/train}
EVAL_DATA=${EVAL_DATA:-data/imagenet/val}
DATA_FORMAT=${DATA_FORMAT:-imagefolder}
TRAIN_SUBSET=${TRAIN_SUBSET:-50000}
FEATURE_POINTS=${FEATURE_POINTS:-"encoder projector"}
METHODS=${METHODS:-"logreg prototype"}
SEED=${SEED:-0}
BATCH_SIZE=${BATCH_SIZE:-64}
NUM_WORKERS=${NUM_WORKERS:-8}
DEVICE=${DEVICE:-auto}
CACHE_DIR=${CACHE_DIR:-${PIVOT_FEATURE_CACHE:-$HOME/.cache/pivot/features}}
OUTPUT_DIR=${OUTPUT_DIR:-runs/linear_probe/${RUN_BASE}}
source scripts/eval/common.sh

mkdir -p "$OUTPUT_DIR"
pivot_encoders "$@"
shift "$encoder_argc"

# shellcheck disable=SC2086  # word splitting of FEATURE_POINTS and METHODS is intended
"$PYTHON" -m analysis.linear_probe --encoders "${paths[@]}" --run_names "${names[@]}" --feature_points $FEATURE_POINTS \
  --train_data "$TRAIN_DATA" --eval_data "$EVAL_DATA" --data_format "$DATA_FORMAT" --train_subset "$TRAIN_SUBSET" \
  --methods $METHODS --seed "$SEED" --batch_size "$BATCH_SIZE" --num_workers "$NUM_WORKERS" --device "$DEVICE" \
  --cache_dir "$CACHE_DIR" --out "$OUTPUT_DIR/linear_probe.json" --table "$OUTPUT_DIR/linear_probe.md" "$@"
