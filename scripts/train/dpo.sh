#!/usr/bin/env bash
# Stage 2, DPO on MMPR pairs (paper §4 / DESIGN §4): global batch 256, 3 epochs, LR 1e-6, beta 0.1,
# cosine, warmup 0.03, ZeRO-3. Every variable can be set from the environment; extra arguments are
# passed to `python -m llava.train.train` (e.g. --max_steps 2).
set -euo pipefail
source "$(dirname "$0")/paths.sh"
pivot_caller_paths CKPT_PATH DATA_PATH IMAGE_FOLDER OUTPUT_DIR DEEPSPEED LLM_VERSION VISION_MODEL_VERSION
cd "$(dirname "$0")/../.."

LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
VISION_MODEL_VERSION=${VISION_MODEL_VERSION:-siglip2-so16}
# Stage-1 checkpoint to start from (required); FROM_SCRATCH=1 builds the two versions above untrained instead.
CKPT_PATH=${CKPT_PATH:-runs/stage1_full/${LLM_VERSION}_${VISION_MODEL_VERSION}}
pivot_stage2_model  # MODEL_ARGS, MODEL_NAME: the run is named after what is loaded
RUN_BASE=${RUN_BASE:-$MODEL_NAME}
DATA_PATH=${DATA_PATH:-data/mmpr/mmpr_dpo.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/mmpr}
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage2/${RUN_BASE}_dpo}
LOSS_TYPE=${LOSS_TYPE:-dpo}
LR=${LR:-1e-6}
BETA=${BETA:-0.1}
GAMMA=${GAMMA:-0}
EPOCHS=${EPOCHS:-3}
REFERENCE=${REFERENCE:-precomputed}
SEED=${SEED:-42}
SAVE_STEPS=${SAVE_STEPS:-100}
WORKERS=${WORKERS:-4}
REPORT_TO=${REPORT_TO:-none}
# LoRA (llava.train.lora): LORA=1 trains adapters on the LLM (LORA_VISION=1: on the tower too) instead of full weights.
LORA=${LORA:-0}
LORA_R=${LORA_R:-64}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_VISION=${LORA_VISION:-0}

source scripts/train/common.sh
pivot_stage2 "$@"
