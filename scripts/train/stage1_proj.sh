#!/usr/bin/env bash
# Stage 1a, projector pretraining (DESIGN §4): LLaVA-Pretrain 558K, `plain` template, only the projector
# trains, LR 1e-3, 1 epoch, global batch 256, cosine, warmup 0.03, ZeRO-2. Writes a full checkpoint to
# OUTPUT_DIR (stage1_full.sh starts from it) and OUTPUT_DIR/projector/, the projector alone, which
# `--pretrain_mm_mlp_adapter` reloads. Every variable can be set from the environment (distributed ones:
# scripts/train/common.sh); extra arguments go to `python -m llava.train.train` (e.g. --max_steps 2).
set -euo pipefail
source "$(dirname "$0")/paths.sh"
pivot_caller_paths DATA_PATH IMAGE_FOLDER OUTPUT_DIR DEEPSPEED LLM_VERSION VISION_MODEL_VERSION
cd "$(dirname "$0")/../.."

LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
VISION_MODEL_VERSION=${VISION_MODEL_VERSION:-siglip2-so16}
RUN_BASE=${RUN_BASE:-${LLM_VERSION}_${VISION_MODEL_VERSION}}
DATA_PATH=${DATA_PATH:-data/llava_pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/llava_pretrain/images}
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage1_proj/$RUN_BASE}
LR=${LR:-1e-3}
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
echo "[stage1a] $LLM_VERSION + $VISION_MODEL_VERSION data=$DATA_PATH out=$OUTPUT_DIR gpus=$NUM_GPUS x $NNODES batch=$GLOBAL_BATCH ($PER_DEVICE_BATCH x GA $GA)"

pivot_train --llm "$LLM_VERSION" --vision_tower "$VISION_MODEL_VERSION" \
  --conv_template plain --loss_type sft --reference none --mm_tunable_parts mm_mlp_adapter --save_total_limit 1 \
  -- "$@"
