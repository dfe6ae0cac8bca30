#!/usr/bin/env bash
# Cambrian-16 benchmarks of one checkpoint (DESIGN §5; paper Table 1 and appendix Tables R-T) through lmms-eval
# with the pivot adapter (`--model pivot`, llava/eval/lmms_adapter.py): greedy decoding, per-sample logs always
# kept (CV-Bench-2D/3D and MMVP are recomputed from them), then the table by `python -m analysis.benchmarks`
# -> $OUTPUT_DIR/{<model>/<timestamp>_results.json, *_samples_<task>.jsonl, benchmarks.{csv,md,json}}.
#
# Usage: scripts/eval/cambrian16.sh CHECKPOINT [extra lmms-eval arguments, e.g. --limit 8]
# Every variable below can be set from the environment. Needs the eval extra (lmms-eval, see the Makefile) and
# the benchmark data: lmms-eval downloads it from the HF hub (or set HF_HOME to a warm cache and HF_HUB_OFFLINE=1).
# MMBench (gpt_eval_score) and MathVista (llm_as_judge_eval) extract answers with an LLM judge: set
# OPENAI_API_KEY (or API_TYPE=azure + AZURE_API_KEY/AZURE_ENDPOINT), else those two scores are not meaningful.
# CHECKPOINT may be relative to the current directory; other relative paths (OUTPUT_DIR, paths in the extra
# arguments such as --include_path) are taken from the repository root, where the script runs.
set -euo pipefail

CHECKPOINT=${1:?usage: scripts/eval/cambrian16.sh CHECKPOINT [extra lmms-eval arguments]}
shift
if [ -d "$CHECKPOINT" ]; then
  CHECKPOINT=$(cd "$CHECKPOINT" && pwd)
fi
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python}
# lmms-eval task names of the 16 benchmarks (analysis/benchmarks.py BENCHMARKS; cv_bench gives both 2D and 3D).
TASKS=${TASKS:-mme,mmbench_en_dev,seedbench,gqa,scienceqa_img,mmmu_val,mathvista_testmini_format,ai2d,chartqa,ocrbench,textvqa_val,docvqa_val,mmvp,realworldqa,cv_bench}
BATCH_SIZE=${BATCH_SIZE:-8}            # requests per forward, per process
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-1024} # only for tasks whose YAML sets no max_new_tokens
DTYPE=${DTYPE:-auto}                   # auto: bfloat16 on GPU, float32 on CPU
RUN_NAME=${RUN_NAME:-$(basename "$CHECKPOINT")}
OUTPUT_DIR=${OUTPUT_DIR:-runs/eval/cambrian16/$RUN_NAME}
# 0 = one CPU process; N >= 1 = `accelerate launch --num_processes N` (data parallel, one model copy per GPU).
# Registry that scores the tasks: cambrian16, or world for the miniature's tasks (llava/data/world_bench.py,
# TASKS=world_colour_choice,... with --include_path <bench>/tasks).
SUITE=${SUITE:-cambrian16}
NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
PORT=${PORT:-29501}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}

if [ ! -f "$CHECKPOINT/config.json" ]; then
  echo "CHECKPOINT=$CHECKPOINT is not a checkpoint directory (no config.json)" >&2
  exit 1
fi
case "$CHECKPOINT" in
  *,*) echo "CHECKPOINT=$CHECKPOINT contains a comma, which lmms-eval's --model_args cannot carry" >&2; exit 1 ;;
esac

MODEL_ARGS="pretrained=$CHECKPOINT,dtype=$DTYPE,max_new_tokens=$MAX_NEW_TOKENS"
if [ "$NUM_GPUS" -gt 0 ]; then
  LAUNCH=("$PYTHON" -m accelerate.commands.launch --num_processes "$NUM_GPUS" --main_process_port "$PORT" -m lmms_eval)
else
  LAUNCH=("$PYTHON" -m lmms_eval)
  MODEL_ARGS="$MODEL_ARGS,device=cpu"
fi

EVAL=("${LAUNCH[@]}" --model pivot --model_args "$MODEL_ARGS" --tasks "$TASKS" --batch_size "$BATCH_SIZE"
  --output_path "$OUTPUT_DIR" --log_samples "$@")
echo "[cambrian16] ${EVAL[*]}"
"${EVAL[@]}"

# lmms-eval exits 0 even when evaluation failed: the aggregation below fails if no results file was written.
"$PYTHON" -m analysis.benchmarks "$OUTPUT_DIR" --out_dir "$OUTPUT_DIR" --suite "$SUITE"
