#!/usr/bin/env bash
# Segmentation probe (patch-seg protocol on ADE20K; DESIGN §5) of a list of exported encoders -> one table:
# union patch labels over 151 classes, 2-layer MLP head on frozen cached patch tokens, BCE, AdamW 1e-3,
# batch 32, 5 epochs, 6 seeds; macro patch recall (mean ± std) plus micro accuracy, precision, F1.
# Writes $OUTPUT_DIR/seg_probe.json (docs/CONTRACTS.md §4, kind seg_probe), seg_probe.md and png/<run>/*.png.
#
#   scripts/eval/seg_probe.sh [NAME=]EXPORT_DIR ... [--extra --flags for python -m analysis.seg_probe]
#
# Without encoder arguments the matched SFT and DPO runs of $RUN_BASE are probed. DATA is an ADE20K-layout
# root (images/{training,validation}, annotations/{training,validation}), e.g. ADEChallengeData2016 or the
# synthetic world's <world>/ade. Every variable below can be set from the environment.
#
# Original-encoder baseline: BASELINE_TOWER=siglip2-so16 (preset, hub id or dir) exports the untrained tower
# once, exactly as the MLLM reads it (`python -m llava.export --vision_tower`, no projector), to $BASELINE_DIR
# and probes it as run "$BASELINE_NAME" next to the trained runs (FEATURE_POINT=encoder only). Give the trained
# runs' tower flags in BASELINE_EXPORT_ARGS (e.g. "--mm_vision_select_layer -2"; default: the builder's).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python}
LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
VISION_MODEL_VERSION=${VISION_MODEL_VERSION:-siglip2-so16}
RUN_BASE=${RUN_BASE:-${LLM_VERSION}_${VISION_MODEL_VERSION}}
# A GRPO run (scripts/train/grpo.sh) is one more entry: ENCODERS="... grpo=runs/stage2/${RUN_BASE}_grpo/export".
ENCODERS=${ENCODERS:-"sft=runs/stage2/${RUN_BASE}_sft/export dpo=runs/stage2/${RUN_BASE}_dpo/export"}
DATA=${DATA:-data/ADEChallengeData2016}
SEEDS=${SEEDS:-6}
FEATURE_POINT=${FEATURE_POINT:-encoder}
NUM_CLASSES=${NUM_CLASSES:-151}
EPOCHS=${EPOCHS:-5}
BATCH_SIZE=${BATCH_SIZE:-32}
FEATURE_BATCH_SIZE=${FEATURE_BATCH_SIZE:-64}
N_QUALITATIVE=${N_QUALITATIVE:-8}
DEVICE=${DEVICE:-auto}
CACHE_DIR=${CACHE_DIR:-${PIVOT_FEATURE_CACHE:-$HOME/.cache/pivot/features}}
OUTPUT_DIR=${OUTPUT_DIR:-runs/seg_probe/${RUN_BASE}}
source scripts/eval/common.sh

if [ -n "$BASELINE_TOWER" ] && [ "$FEATURE_POINT" = projector ]; then
  echo "[seg_probe] BASELINE_TOWER exports no projector: FEATURE_POINT=projector cannot include it" >&2
  exit 1
fi
mkdir -p "$OUTPUT_DIR"
pivot_encoders "$@"
shift "$encoder_argc"
"$PYTHON" -m analysis.seg_probe --encoders "${paths[@]}" --run_names "${names[@]}" --data "$DATA" \
  --seeds "$SEEDS" --feature_point "$FEATURE_POINT" --num_classes "$NUM_CLASSES" --epochs "$EPOCHS" \
  --batch_size "$BATCH_SIZE" --feature_batch_size "$FEATURE_BATCH_SIZE" --num_qualitative "$N_QUALITATIVE" \
  --device "$DEVICE" --cache_dir "$CACHE_DIR" --png_dir "$OUTPUT_DIR/png" \
  --out "$OUTPUT_DIR/seg_probe.json" --table "$OUTPUT_DIR/seg_probe.md" "$@"
