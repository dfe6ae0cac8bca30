#!/usr/bin/env bash
# Stage 3, step 2 (PIVOT evaluation, DESIGN §4): projector + LLM finetuning on Cambrian-737K, encoder and
# reused projector layers still frozen (llava.model.stage3 re-freezes them on load), `qwen_1_5` template,
# LR 1e-5, 1 epoch, global batch 256, cosine, warmup 0.03, ZeRO-2. Starts from the pivot_proj.sh checkpoint
# CKPT_PATH. Every variable can be set from the environment; extra arguments go to `python -m llava.train.train`.
set -euo pipefail
source "$(dirname "$0")/paths.sh"
pivot_caller_paths CKPT_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR DEEPSPEED LLM_VERSION
cd "$(dirname "$0")/../.."

LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
SOURCE_RUN=${SOURCE_RUN:-qwen2.5-1.5b_siglip2-so16_dpo}
REUSE_LAYERS=${REUSE_LAYERS:-1}
RUN_BASE=${RUN_BASE:-${LLM_VERSION}_from_${SOURCE_RUN}_reuse${REUSE_LAYERS}}
CKPT_PATH=${CKPT_PATH:-runs/pivot_proj/$RUN_BASE}
DATA_PATH=${DATA_PATH:-data/cambrian/cambrian_737k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/cambrian}
OUTPUT_DIR=${OUTPUT_DIR:-runs/pivot_full/$RUN_BASE}
LR=${LR:-1e-5}
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
if [ ! -d "$CKPT_PATH" ]; then
  echo "pivot_full.sh: no pivot_proj.sh checkpoint at CKPT_PATH=$CKPT_PATH" >&2
  exit 2
fi
echo "[pivot_full] $CKPT_PATH data=$DATA_PATH out=$OUTPUT_DIR gpus=$NUM_GPUS x $NNODES batch=$GLOBAL_BATCH ($PER_DEVICE_BATCH x GA $GA)"

pivot_train --model_name_or_path "$CKPT_PATH" \
  --conv_template qwen_1_5 --loss_type sft --reference none --save_total_limit 1 \
  --mm_tunable_parts mm_mlp_adapter,mm_language_model \
  -- "$@"
