#!/usr/bin/env bash
# Stage 3, step 1 (PIVOT evaluation, DESIGN §4, llava.model.stage3): the frozen encoder of a Stage-2 run
# (checkpoint or exported encoder) under a new LLM; REUSE_LAYERS (0, 1, 2) frozen layers of the Stage-2
# projector plus new trainable ones (paper default 1 + 1). Only the new projector layers train: LLaVA-Pretrain
# 558K, `plain` template, LR 1e-3, 1 epoch, global batch 256, cosine, warmup 0.03, ZeRO-2. pivot_full.sh
# continues from OUTPUT_DIR. Every variable can be set from the environment; extra arguments go to
# `python -m llava.train.train`.
set -euo pipefail
source "$(dirname "$0")/paths.sh"
pivot_caller_paths STAGE2_SOURCE DATA_PATH IMAGE_FOLDER OUTPUT_DIR DEEPSPEED LLM_VERSION
cd "$(dirname "$0")/../.."

LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
SOURCE_RUN=${SOURCE_RUN:-qwen2.5-1.5b_siglip2-so16_dpo}
STAGE2_SOURCE=${STAGE2_SOURCE:-runs/stage2/$SOURCE_RUN}
REUSE_LAYERS=${REUSE_LAYERS:-1}
RUN_BASE=${RUN_BASE:-${LLM_VERSION}_from_${SOURCE_RUN}_reuse${REUSE_LAYERS}}
DATA_PATH=${DATA_PATH:-data/llava_pretrain/blip_laion_cc_sbu_558k.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/llava_pretrain/images}
OUTPUT_DIR=${OUTPUT_DIR:-runs/pivot_proj/$RUN_BASE}
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
echo "[pivot_proj] encoder of $STAGE2_SOURCE -> $LLM_VERSION (reuse $REUSE_LAYERS) data=$DATA_PATH out=$OUTPUT_DIR gpus=$NUM_GPUS x $NNODES batch=$GLOBAL_BATCH ($PER_DEVICE_BATCH x GA $GA)"

pivot_train --stage3_source "$STAGE2_SOURCE" --llm "$LLM_VERSION" --projector_reuse_layers "$REUSE_LAYERS" \
  --conv_template plain --loss_type sft --reference none --mm_tunable_parts mm_mlp_adapter --save_total_limit 1 \
  -- "$@"
