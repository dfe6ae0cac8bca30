#!/usr/bin/env bash
# Grad-CAM of the gradient the vision encoder receives under the SFT and DPO (and GRPO) losses (paper Fig. 7; DESIGN §5),
# with quantitative localisation (share of gradient mass in the question's box, normalised entropy).
# For every NAME=CHECKPOINT in CHECKPOINTS: `python -m analysis.gradcam` over the same samples ->
# OUTPUT_DIR/NAME/{gradcam.json, maps/, images/, overlays/, figures/}; then the per-(run, loss, step) means
# -> OUTPUT_DIR/summary.{md,csv}. The paper's protocol trains a fresh copy of each checkpoint on each single
# sample for max(STEPS) updates (LRs: SFT 5e-6, DPO 1e-6; cosine, warmup 0.03) and maps the gradient at STEPS;
# STEPS=0 maps the checkpoint's own gradient without training.
# Every variable can be set from the environment; extra arguments go to `python -m analysis.gradcam`
# (e.g. --learning_rates sft=5e-6 dpo=1e-6, --ref_logps runs/stage2/<run>_dpo/ref_logps.json).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python}
LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
VISION_MODEL_VERSION=${VISION_MODEL_VERSION:-siglip2-so16}
RUN_BASE=${RUN_BASE:-${LLM_VERSION}_${VISION_MODEL_VERSION}}
# Space-separated NAME=CHECKPOINT list: the Stage-1 model (the paper's starting point) and the two Stage-2 runs.
# A GRPO run (scripts/train/grpo.sh) is one more entry: grpo=runs/stage2/${RUN_BASE}_grpo (the GRPO loss itself: LOSS_TYPES).
CHECKPOINTS=${CHECKPOINTS:-"stage1=runs/stage1_full/${RUN_BASE} sft=runs/stage2/${RUN_BASE}_sft dpo=runs/stage2/${RUN_BASE}_dpo"}
DATA_PATH=${DATA_PATH:-data/mmpr/mmpr_dpo.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/mmpr}
# Sample list: a file with one id per line; empty = the first NUM_SAMPLES records of DATA_PATH.
IDS_FILE=${IDS_FILE:-}
NUM_SAMPLES=${NUM_SAMPLES:-64}
# "sft dpo grpo" adds the GRPO loss of a group sampled per step (analysis/gradcam_grpo.py; its flags, e.g.
# --num_generations 8 --reward_funcs exact_match format, go in the extra arguments).
LOSS_TYPES=${LOSS_TYPES:-"sft dpo"}
STEPS=${STEPS:-20}
BETA=${BETA:-0.1}
DEVICE=${DEVICE:-}
DTYPE=${DTYPE:-float32}
OUTPUT_DIR=${OUTPUT_DIR:-runs/gradcam/${RUN_BASE}}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

if [ -n "$IDS_FILE" ]; then
  SAMPLES=(--ids_file "$IDS_FILE")
else
  SAMPLES=(--num_samples "$NUM_SAMPLES")
fi
DEVICE_ARGS=()
if [ -n "$DEVICE" ]; then
  DEVICE_ARGS=(--device "$DEVICE")
fi

RESULTS=()
for entry in $CHECKPOINTS; do
  name=${entry%%=*}
  checkpoint=${entry#*=}
  if [ "$name" = "$entry" ] || [ ! -d "$checkpoint" ]; then
    echo "CHECKPOINTS entry '$entry': expected NAME=DIR with an existing checkpoint directory" >&2
    exit 1
  fi
  echo "[gradcam] $name: $checkpoint -> $OUTPUT_DIR/$name"
  # shellcheck disable=SC2086  # word splitting of LOSS_TYPES / STEPS is intended
  "$PYTHON" -m analysis.gradcam --checkpoint "$checkpoint" --run_name "$name" --data_path "$DATA_PATH" \
    --image_folder "$IMAGE_FOLDER" "${SAMPLES[@]}" --loss_types $LOSS_TYPES --steps $STEPS --beta "$BETA" \
    --dtype "$DTYPE" "${DEVICE_ARGS[@]}" --out_dir "$OUTPUT_DIR/$name" "$@"
  RESULTS+=("$OUTPUT_DIR/$name/gradcam.json")
done

"$PYTHON" -m analysis.gradcam_metrics "${RESULTS[@]}" --out_dir "$OUTPUT_DIR"
