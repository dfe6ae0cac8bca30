#!/usr/bin/env bash
# Stage 1b, full training (DESIGN §4): LLaVA-OneVision single-image data (a YAML mixture), `qwen_1_5`
# template, every part trains, LR 1e-5 with the vision tower at 2e-6, 1 epoch, global batch 256, cosine,
# warmup 0.03, ZeRO-2. Starts from the Stage-1a checkpoint CKPT_PATH; with PRETRAIN_ADAPTER set it instead
# builds LLM_VERSION + VISION_MODEL_VERSION and loads that projector (a Stage-1a OUTPUT_DIR/projector/).
# Every variable can be set from the environment; extra arguments go to `python -m llava.train.train`.
set -euo pipefail
source "$(dirname "$0")/paths.sh"
pivot_caller_paths CKPT_PATH PRETRAIN_ADAPTER DATA_PATH IMAGE_FOLDER OUTPUT_DIR DEEPSPEED LLM_VERSION VISION_MODEL_VERSION
cd "$(dirname "$0")/../.."

LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
VISION_MODEL_VERSION=${VISION_MODEL_VERSION:-siglip2-so16}
RUN_BASE=${RUN_BASE:-${LLM_VERSION}_${VISION_MODEL_VERSION}}
CKPT_PATH=${CKPT_PATH:-runs/stage1_proj/$RUN_BASE}
PRETRAIN_ADAPTER=${PRETRAIN_ADAPTER:-}
DATA_PATH=${DATA_PATH:-data/onevision/single_image.yaml}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/onevision}
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage1_full/$RUN_BASE}
LR=${LR:-1e-5}
VISION_LR=${VISION_LR:-2e-6}
EPOCHS=${EPOCHS:-1}
SEED=${SEED:-42}
SAVE_STEPS=${SAVE_STEPS:-500}
WORKERS=${WORKERS:-4}
REPORT_TO=${REPORT_TO:-none}
# LoRA (llava.train.lora): LORA=1 trains adapters on the LLM (LORA_VISION=1: on the tower too) instead of full weights.
LORA=${LORA:-0}
LORA_R=${LORA_R:-64}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_VISION=${LORA_VISION:-0}
DEEPSPEED=${DEEPSPEED:-scripts/zero2.json}

source scripts/train/common.sh
GA=$(pivot_grad_accum)
if [ -n "$PRETRAIN_ADAPTER" ]; then
  MODEL_ARGS=(--llm "$LLM_VERSION" --vision_tower "$VISION_MODEL_VERSION" --pretrain_mm_mlp_adapter "$PRETRAIN_ADAPTER")
elif [ -d "$CKPT_PATH" ]; then
  MODEL_ARGS=(--model_name_or_path "$CKPT_PATH")
else
  echo "stage1_full.sh: no Stage-1a checkpoint at CKPT_PATH=$CKPT_PATH (run stage1_proj.sh, or set PRETRAIN_ADAPTER)" >&2
  exit 2
fi
echo "[stage1b] ${MODEL_ARGS[*]} data=$DATA_PATH out=$OUTPUT_DIR gpus=$NUM_GPUS x $NNODES batch=$GLOBAL_BATCH ($PER_DEVICE_BATCH x GA $GA)"

pivot_train "${MODEL_ARGS[@]}" \
  --conv_template qwen_1_5 --loss_type sft --reference none --save_total_limit 1 \
  --mm_tunable_parts mm_vision_tower,mm_mlp_adapter,mm_language_model --mm_vision_tower_lr "$VISION_LR" \
  -- "$@"
