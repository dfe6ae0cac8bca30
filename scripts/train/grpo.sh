#!/usr/bin/env bash
# Stage 2, GRPO on the MMPR prompts with a verifiable answer (issue 16): the same Stage-1 checkpoint,
# prompts (ids and order) and global batch of 256 prompts as sft.sh / dpo.sh, NUM_GENERATIONS completions
# each, rewards REWARD_FUNCS, clipped surrogate, LOSS_NORMALIZATION grpo|dapo|dr_grpo. BETA > 0 adds a
# k3 KL term to a frozen copy of the starting model (not under ZeRO-3: use DEEPSPEED=scripts/zero2.json).
# Every variable can be set from the environment; extra arguments are passed to
# `python -m llava.train.train` (e.g. --max_steps 2).
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
DATA_PATH=${DATA_PATH:-data/mmpr/mmpr_grpo.json}
IMAGE_FOLDER=${IMAGE_FOLDER:-data/mmpr}
OUTPUT_DIR=${OUTPUT_DIR:-runs/stage2/${RUN_BASE}_grpo}
LOSS_TYPE=grpo
GAMMA=0  # no SFT term (refused by grpo if set)
REFERENCE=none  # the KL reference, if BETA > 0, is a frozen copy of the starting model
LR=${LR:-1e-6}
BETA=${BETA:-0}
EPOCHS=${EPOCHS:-3}
SEED=${SEED:-42}
SAVE_STEPS=${SAVE_STEPS:-100}
WORKERS=${WORKERS:-4}
REPORT_TO=${REPORT_TO:-none}
NUM_GENERATIONS=${NUM_GENERATIONS:-8}
MAX_COMPLETION_LENGTH=${MAX_COMPLETION_LENGTH:-512}
TEMPERATURE=${TEMPERATURE:-1.0}
TOP_P=${TOP_P:-1.0}
EPSILON=${EPSILON:-0.2}
NUM_ITERATIONS=${NUM_ITERATIONS:-1}
LOSS_NORMALIZATION=${LOSS_NORMALIZATION:-dapo}
REWARD_FUNCS=${REWARD_FUNCS:-exact_match format}
REWARD_WEIGHTS=${REWARD_WEIGHTS:-1 0.5}
GENERATION_BACKEND=${GENERATION_BACKEND:-hf}
# LoRA (llava.train.lora): LORA=1 trains adapters on the LLM (LORA_VISION=1: on the tower too) instead of full weights.
LORA=${LORA:-0}
LORA_R=${LORA_R:-64}
LORA_ALPHA=${LORA_ALPHA:-16}
LORA_DROPOUT=${LORA_DROPOUT:-0.05}
LORA_VISION=${LORA_VISION:-0}
# Prompts per device per micro-batch (each becomes NUM_GENERATIONS scored sequences).
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-1}

source scripts/train/common.sh
# shellcheck disable=SC2086  # REWARD_FUNCS / REWARD_WEIGHTS are word lists
pivot_stage2 --num_generations "$NUM_GENERATIONS" --max_completion_length "$MAX_COMPLETION_LENGTH" \
  --temperature "$TEMPERATURE" --top_p "$TOP_P" --epsilon "$EPSILON" --num_iterations "$NUM_ITERATIONS" \
  --loss_normalization "$LOSS_NORMALIZATION" --reward_funcs $REWARD_FUNCS --reward_weights $REWARD_WEIGHTS \
  --generation_backend "$GENERATION_BACKEND" "$@"
