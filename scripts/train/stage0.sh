#!/usr/bin/env bash
# Stage 0, vision-tower pretraining on the synthetic world (llava.train.stage0): stands in for the
# pretraining that the paper's encoders (SigLIP2, CLIP, ...) arrive with, for the miniature's random tiny
# towers. Multi-label BCE (colours present, shapes present, object count) on the mean-pooled tokens of the
# layer the projector reads; writes a plain HF vision model directory to OUTPUT_DIR that stage1_proj.sh
# takes as VISION_MODEL_VERSION. Every variable can be set from the environment; extra arguments go to
# `python -m llava.train.stage0` (e.g. --threads 2).
set -euo pipefail
cd "$(dirname "$0")/../.."

VISION_MODEL_VERSION=${VISION_MODEL_VERSION:-runs/tiny/siglip}
WORLD=${WORLD:-runs/world}
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage0/$(basename "$VISION_MODEL_VERSION")}
STEPS=${STEPS:-600}
BATCH=${BATCH:-64}
LR=${LR:-1e-3}
SEED=${SEED:-42}
PYTHON=${PYTHON:-python}

echo "[stage0] $VISION_MODEL_VERSION world=$WORLD out=$OUTPUT_DIR steps=$STEPS batch=$BATCH lr=$LR"
"$PYTHON" -m llava.train.stage0 --vision_tower "$VISION_MODEL_VERSION" --world "$WORLD" --output_dir "$OUTPUT_DIR" \
  --steps "$STEPS" --batch_size "$BATCH" --learning_rate "$LR" --seed "$SEED" "$@"
