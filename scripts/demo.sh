#!/usr/bin/env bash
# The whole paper in miniature, end to end on CPU, offline (`make demo` runs this):
# tiny presets → synthetic world → Stage 0 (tower pretraining on the world) → Stage 1a → Stage 1b → Stage 2
# SFT, DPO and GRPO from the same Stage-1 checkpoint on the same samples, for every seed in SEEDS (+ controls with
# DEMO_CONTROLS=1) → encoder export → world benchmark through lmms-eval, linear probe, segmentation probe,
# Platonic alignment (MiniLM as reference LM), Grad-CAM with localisation → runs/demo/report/report.md with
# claim-by-claim verdicts. Tiny models, sizes and steps chosen by measurement (docs/DECISIONS.md, "The
# miniature as an instrument"): the numbers are a small real experiment, not the paper's result.
# Every variable can be set from the environment, e.g. DEMO_SCALE=medium make demo.
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_SCALE=${DEMO_SCALE:-small}   # smoke (CI, ~2 min) | small (default, ~17 min on 2 idle cores) | medium
DEMO_DIR=${DEMO_DIR:-runs/demo}
SEED=${SEED:-0}
PYTHON=${PYTHON:-python}

# Worlds and step counts per scale. S0_STEPS: Stage-0 steps of S0_BATCH images; EPOCHS_S1A/EPOCHS_S1B: epochs
# over the NUM_TRAIN captions / instruct conversations at GLOBAL_BATCH. SEG_SEEDS head seeds per probe, trained on
# a seeded subset of SEG_IMAGES training images (the seg probe's per-patch head is the demo's costliest analysis:
# ~10 CPU s per 1,000 images and head seed; docs/DECISIONS.md, "Demo cost").
case "$DEMO_SCALE" in
  smoke)  NUM_TRAIN=48;  NUM_VAL=24;  IMAGE_SIZE=32; MMPR_SIZE=32;  GLOBAL_BATCH=8;  EPOCHS_S1A=1; EPOCHS_S1B=1; EPOCHS_S2=1
          S0_STEPS=20;  SEG_SEEDS=2; SEG_IMAGES=48;   ALIGN_SAMPLES=24;  ALIGN_SEEDS="0 1";   GRADCAM_SAMPLES=2; GRADCAM_STEPS="0 2" ;;
  small)  NUM_TRAIN=2000; NUM_VAL=300; IMAGE_SIZE=64; MMPR_SIZE=256; GLOBAL_BATCH=16; EPOCHS_S1A=0.5; EPOCHS_S1B=2; EPOCHS_S2=3
          S0_STEPS=300; SEG_SEEDS=3; SEG_IMAGES=1000; ALIGN_SAMPLES=96;  ALIGN_SEEDS="0 1 2"; GRADCAM_SAMPLES=6; GRADCAM_STEPS="0 5 20" ;;
  medium) NUM_TRAIN=4000; NUM_VAL=500; IMAGE_SIZE=64; MMPR_SIZE=1024; GLOBAL_BATCH=32; EPOCHS_S1A=1; EPOCHS_S1B=3; EPOCHS_S2=3
          S0_STEPS=1200; SEG_SEEDS=6; SEG_IMAGES=4000; ALIGN_SAMPLES=256; ALIGN_SEEDS="0 1 2"; GRADCAM_SAMPLES=16; GRADCAM_STEPS="0 5 20" ;;
  *) echo "DEMO_SCALE=$DEMO_SCALE: choose smoke, small or medium" >&2; exit 2 ;;
esac
# Stage-2 training seeds (>= 2: the report pairs DPO with SFT seed by seed) and the controls
# (frozen-encoder DPO, sign-flipped DPO; on by default at medium): DEMO_CONTROLS=1 turns them on.
case "$DEMO_SCALE" in
  smoke)  SEEDS=${SEEDS:-"0 1"}; DEMO_CONTROLS=${DEMO_CONTROLS:-0}; BENCH_PER_TYPE=${BENCH_PER_TYPE:-8} ;;
  small)  SEEDS=${SEEDS:-"0 1"}; DEMO_CONTROLS=${DEMO_CONTROLS:-0}; BENCH_PER_TYPE=${BENCH_PER_TYPE:-48} ;;
  medium) SEEDS=${SEEDS:-"0 1 2"}; DEMO_CONTROLS=${DEMO_CONTROLS:-1}; BENCH_PER_TYPE=${BENCH_PER_TYPE:-128} ;;
esac
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-8}
S0_BATCH=${S0_BATCH:-64}
# Tiny model sizes (llava.tiny): a 4-layer SigLIP on 8-px patches and a 4-layer Qwen2 deep enough to
# ground its answer in the question (docs/DECISIONS.md).
VISION_HIDDEN=${VISION_HIDDEN:-64}; VISION_LAYERS=${VISION_LAYERS:-4}; PATCH=${PATCH:-8}
LLM_HIDDEN=${LLM_HIDDEN:-128}; LLM_LAYERS=${LLM_LAYERS:-4}
# One torch thread per process: with 2 threads a run slows several-fold as soon as another process takes a
# core (docs/DECISIONS.md, "Threads"); set DEMO_THREADS=2 on an otherwise idle machine.
DEMO_THREADS=${DEMO_THREADS:-1}
export OMP_NUM_THREADS=$DEMO_THREADS MKL_NUM_THREADS=$DEMO_THREADS
# Learning rates are scaled up for tiny models (the paper's would barely move them); Stage 1b keeps
# the paper's 5:1 LLM:tower ratio. DPO runs at 3e-4, not at the paper's 5:1 SFT:DPO ratio (1e-4): at 1e-4 its
# 48 steps barely move the Stage-1 model and the sign-flipped control cannot be told from it; at 3e-4 the flip
# loses colour VQA while DPO keeps it (docs/DECISIONS.md, "The demo's DPO step size").
LR_S0=${LR_S0:-1e-3}
LR_S1A=${LR_S1A:-1e-3}; LR_S1B=${LR_S1B:-1e-3}; VISION_LR_S1B=${VISION_LR_S1B:-2e-4}
LR_SFT=${LR_SFT:-5e-4}; LR_DPO=${LR_DPO:-3e-4}; BETA=${BETA:-0.1}
# GRPO (scripts/train/grpo.sh, no KL term): GRPO_G completions of at most GRPO_MAX_TOKENS tokens per prompt, rewarded
# by named_answer (the world benchmark's answer rule: the first value named; Stage 1b's short answers are 5-7 tokens
# and its yes/no answers start with the value, so 8 tokens hold the reward's whole signal). G 8 × 8 tokens at 3e-4:
# the measured setting whose training reward rises at both seeds, at ≈ 1.2× a DPO run's CPU (docs/DECISIONS.md,
# "GRPO in the miniature").
LR_GRPO=${LR_GRPO:-3e-4}; GRPO_G=${GRPO_G:-8}; GRPO_MAX_TOKENS=${GRPO_MAX_TOKENS:-8}

TINY=$DEMO_DIR/tiny; WORLD=$DEMO_DIR/world; DATA=$DEMO_DIR/data; RESULTS=$DEMO_DIR/results
export PYTHON LLM_VERSION=$TINY/llm VISION_MODEL_VERSION=$DEMO_DIR/stage0 IMAGE_FOLDER=$WORLD
export GLOBAL_BATCH PER_DEVICE_BATCH SEED WORKERS=0 SAVE_STEPS=100000 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export MPLBACKEND=Agg TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error}

START=$SECONDS
LOG=$DEMO_DIR/logs
cpu_now() {  # CPU=user + system CPU seconds of every finished child of this script (`times` must run in this shell)
  local file="$LOG/.times.$BASHPID"  # one file per (sub)shell: pstage's subshells run side by side
  times >"$file"
  CPU=$(tail -n 1 "$file" | awk '{ t = 0; for (i = 1; i <= 2; i++) { split($i, p, "m"); sub("s", "", p[2]); t += 60 * p[1] + p[2] } printf "%d", t }')
}
run_stage() {  # run_stage NAME COMMAND...: run one stage, log its output, print one line with elapsed and CPU time
  local name=$1 began=$SECONDS cpu_began; shift
  cpu_now; cpu_began=$CPU
  if "$@" >"$LOG/$name.log" 2>&1; then
    cpu_now
    printf '[demo] %-34s ... done in %4ds (cpu %4ds; total %4ds)\n' "$name" $((SECONDS - began)) $((CPU - cpu_began)) \
      $((SECONDS - START))
  else
    printf '[demo] %-34s ... FAILED; last lines of %s:\n' "$name" "$LOG/$name.log"; tail -n 30 "$LOG/$name.log"
    return 1
  fi
}
stage() { run_stage "$@" || exit 1; }

# Independent stages run DEMO_JOBS at a time, one torch thread each: background COMMAND... starts a command (a
# stage, or a function running several stages in order) once a slot is free; pwait waits for all of them and
# fails if any failed. The jobs are tracked by pid (bash's `jobs` listing, read through a command substitution,
# missed running jobs and let pwait return early). Callers queue the longest jobs first, so that the last ones to
# finish are short.
DEMO_JOBS=${DEMO_JOBS:-2}
PIDS=()
background() {
  local pid running failed=0
  while :; do
    running=()
    for pid in "${PIDS[@]}"; do
      if kill -0 "$pid" 2>/dev/null; then running+=("$pid"); else wait "$pid" || failed=1; fi
    done
    PIDS=("${running[@]}")
    [ "$failed" = 0 ] || { pwait; exit 1; }
    [ "${#PIDS[@]}" -lt "$DEMO_JOBS" ] && break
    wait -n 2>/dev/null || sleep 1  # returns when a job ends (at once if bash has none left to report)
  done
  ( "$@" ) &
  PIDS+=("$!")
}
pstage() { background run_stage "$@"; }
pwait() {
  local failed=0 pid
  for pid in "${PIDS[@]}"; do wait "$pid" || failed=1; done
  PIDS=()
  [ "$failed" = 0 ] || exit 1
}

# Only a directory this script made (it holds the marker) is ever deleted; any other non-empty one is refused.
MARKER=.pivot-demo-dir
if [ -d "$DEMO_DIR" ] && [ -n "$(ls -A "$DEMO_DIR")" ]; then
  if [ ! -f "$DEMO_DIR/$MARKER" ]; then
    echo "[demo] DEMO_DIR=$DEMO_DIR is not empty and was not made by scripts/demo.sh (no $MARKER): refusing" \
      "to delete it; choose another DEMO_DIR or empty it yourself" >&2
    exit 2
  fi
  rm -rf "$DEMO_DIR"
fi
mkdir -p "$DEMO_DIR" && touch "$DEMO_DIR/$MARKER" && mkdir -p "$LOG" "$RESULTS"
echo "[demo] scale=$DEMO_SCALE dir=$DEMO_DIR (per-stage logs in $LOG)"
# The presets and the world are independent, and so are Stage 0 and the MMPR conversion; then Stage 1 (one
# process, one core) runs beside everything that needs only Stage 0 (start_tower below).
pstage tiny_presets     "$PYTHON" -m llava.tiny "$TINY" --seed "$SEED" --image_size "$IMAGE_SIZE" --towers siglip \
                          --vision_hidden "$VISION_HIDDEN" --vision_layers "$VISION_LAYERS" --patch_size "$PATCH" \
                          --llm_hidden "$LLM_HIDDEN" --llm_layers "$LLM_LAYERS"
pstage world            "$PYTHON" -m llava.data.synthetic --out_dir "$WORLD" --seed "$SEED" \
                          --num_train "$NUM_TRAIN" --num_val "$NUM_VAL" --image_size "$IMAGE_SIZE" --label colour
pwait
SEG_CLASSES=$("$PYTHON" -c "import json,sys; print(len(json.load(open(sys.argv[1]))))" "$WORLD/ade/classes.json")
pstage stage0_tower     env VISION_MODEL_VERSION="$TINY/siglip" WORLD="$WORLD" OUTPUT_DIR="$DEMO_DIR/stage0" \
                          STEPS="$S0_STEPS" BATCH="$S0_BATCH" LR="$LR_S0" bash scripts/train/stage0.sh
pstage mmpr_convert     "$PYTHON" -m llava.data.mmpr --meta_path "$WORLD/mmpr/meta.json" --out_dir "$DATA" \
                          --size "$MMPR_SIZE" --seed "$SEED" --tokenizer "$TINY/llm" --image_folder "$WORLD" \
                          --image_tokens $(( (IMAGE_SIZE / PATCH) ** 2 ))  # tiny SigLIP: square, no CLS
pwait

# Encoder analyses (one results file per call; analysis.report reads them all): linear_probe / seg_probe SEED OUT
# NAME=MODEL... probe the world's label and its colour masks; each training seed draws its own probe seeds.
split_named() {  # split_named NAME=MODEL...: sets NAMES and ENCODERS
  local pair
  NAMES=(); ENCODERS=()
  for pair in "$@"; do NAMES+=("${pair%%=*}"); ENCODERS+=("${pair#*=}"); done
}
linear_probe() {
  local seed=$1 out=$2; shift 2
  split_named "$@"
  "$PYTHON" -m analysis.linear_probe --encoders "${ENCODERS[@]}" --run_names "${NAMES[@]}" \
    --train_data "$WORLD/imagefolder" --train_split train --eval_data "$WORLD/imagefolder" --eval_split val \
    --feature_points encoder projector --methods logreg prototype --seed "$seed" --out "$out" \
    --cache_dir "$DEMO_DIR/cache"
}
seg_probe() {
  local seed=$1 out=$2; shift 2
  split_named "$@"
  "$PYTHON" -m analysis.seg_probe --encoders "${ENCODERS[@]}" --run_names "${NAMES[@]}" --data "$WORLD/ade" \
    --num_classes "$SEG_CLASSES" --seeds "$SEG_SEEDS" --first_seed $((seed * SEG_SEEDS)) --out "$out" \
    --max_train_images "$SEG_IMAGES" --png_dir "$(dirname "$out")/seg_examples" --cache_dir "$DEMO_DIR/cache" \
    --warmup_steps 8  # patch-seg warms up 500 of ~3,160 steps; the small demo runs 160
}
stage1() {
  run_stage stage1a_projector env DATA_PATH="$WORLD/llava/pretrain.json" OUTPUT_DIR="$DEMO_DIR/stage1_proj" \
    LR="$LR_S1A" EPOCHS="$EPOCHS_S1A" bash scripts/train/stage1_proj.sh --save_strategy no &&
    run_stage stage1b_full env CKPT_PATH="$DEMO_DIR/stage1_proj" DATA_PATH="$WORLD/llava/instruct.json" \
      OUTPUT_DIR="$DEMO_DIR/stage1_full" LR="$LR_S1B" VISION_LR="$VISION_LR_S1B" \
      EPOCHS="$EPOCHS_S1B" bash scripts/train/stage1_full.sh --save_strategy no
}
# The tower Stage 1 starts from, exported as the MLLM reads it (the untrained-by-the-MLLM control) and probed once
# per training seed, and the world benchmark's held-out questions (llava/data/world_bench.py).
BENCH=$DEMO_DIR/bench
start_tower() {
  run_stage original_tower "$PYTHON" -m llava.export --vision_tower "$VISION_MODEL_VERSION" "$DEMO_DIR/original" &&
    run_stage world_bench "$PYTHON" -m llava.data.world_bench --world "$WORLD" --out_dir "$BENCH" \
      --per_type "$BENCH_PER_TYPE" || return 1
  local S
  for S in $SEEDS; do
    run_stage "seg_probe_original_s$S" seg_probe "$S" "$RESULTS/seed$S/seg_probe_original.json" \
      original="$DEMO_DIR/original" &&
      run_stage "linear_probe_original_s$S" linear_probe "$S" "$RESULTS/seed$S/linear_probe_original.json" \
        original="$DEMO_DIR/original" || return 1
  done
}
background stage1
background start_tower
pwait
# Stage 2 from the one Stage-1 checkpoint: SFT, DPO and GRPO per training seed (same samples, same order within
# a seed; GRPO reads the converter's mmpr_grpo.json: the same ids with their answers), and with DEMO_CONTROLS=1
# two controls per seed: DPO with the vision tower frozen (the encoder gets no gradient) and sign-flipped DPO
# (llava/train/losses.py dpo_sign_flipped, it prefers the wrong answers).
CONDITIONS=(sft dpo grpo)
[ "$DEMO_CONTROLS" = 1 ] && CONDITIONS+=(dpo_frozen dpo_flipped)
stage2() {  # stage2 CONDITION SEED: one Stage-2 run into $DEMO_DIR/stage2/CONDITION_sSEED
  local script=dpo.sh lr=$LR_DPO loss=dpo extra=() data=mmpr_dpo.json beta=$BETA
  case $1 in
    sft) script=sft.sh; lr=$LR_SFT; loss=sft ;;
    grpo) script=grpo.sh; lr=$LR_GRPO; loss=grpo; data=mmpr_grpo.json; beta=0 ;;
    dpo_frozen) extra=(--mm_tunable_parts mm_mlp_adapter,mm_language_model) ;;
    dpo_flipped) loss=dpo_sign_flipped ;;
  esac
  env CKPT_PATH="$DEMO_DIR/stage1_full" DATA_PATH="$DATA/$data" OUTPUT_DIR="$DEMO_DIR/stage2/$1_s$2" \
    SEED="$2" LOSS_TYPE="$loss" LR="$lr" BETA="$beta" EPOCHS="$EPOCHS_S2" NUM_GENERATIONS="$GRPO_G" \
    MAX_COMPLETION_LENGTH="$GRPO_MAX_TOKENS" REWARD_FUNCS=named_answer REWARD_WEIGHTS=1 \
    bash "scripts/train/$script" --save_strategy no "${extra[@]}"
}
# Queued longest first (GRPO, the DPO runs, SFT), so that the runs finishing last are short ones.
for C in grpo dpo dpo_frozen dpo_flipped sft; do
  [[ " ${CONDITIONS[*]} " == *" $C "* ]] || continue
  for S in $SEEDS; do pstage "stage2_${C}_s$S" stage2 "$C" "$S"; done
done
pwait

# Then, longest first: the encoder analyses of every training seed over Stage 1 and that seed's Stage-2 runs (each
# results file is stamped with its train_seed so the report pairs DPO and GRPO with SFT seed by seed:
# analysis/claims.py), Grad-CAM of the Stage-1 checkpoint, and the world benchmark through lmms-eval's CLI with
# `--model pivot` for every language model (llava.eval.run_many: one process per group of checkpoints, DEMO_JOBS
# groups, so lmms-eval's imports are paid once per group).
trained() {  # trained SEED: sets TRAINED to NAME=MODEL of Stage 1 and that seed's Stage-2 runs
  local C
  TRAINED=("stage1=$DEMO_DIR/stage1_full")
  for C in "${CONDITIONS[@]}"; do TRAINED+=("$C=$DEMO_DIR/stage2/${C}_s$1"); done
}
for S in $SEEDS; do
  trained "$S"
  pstage "seg_probe_s$S"  seg_probe "$S" "$RESULTS/seed$S/seg_probe.json" "${TRAINED[@]}"
done
# shellcheck disable=SC2086
pstage gradcam          "$PYTHON" -m analysis.gradcam --checkpoint "$DEMO_DIR/stage1_full" \
                          --data_path "$DATA/mmpr_dpo.json" --image_folder "$WORLD" \
                          --num_samples "$GRADCAM_SAMPLES" --steps $GRADCAM_STEPS --loss_types sft dpo grpo \
                          --learning_rates sft="$LR_SFT" dpo="$LR_DPO" grpo="$LR_GRPO" --beta "$BETA" \
                          --num_generations "$GRPO_G" --max_completion_length "$GRPO_MAX_TOKENS" --reward_funcs named_answer \
                          --out_dir "$RESULTS/gradcam"
BENCH_TASKS=$("$PYTHON" -c "import json,sys; print(','.join(json.load(open(sys.argv[1]))['tasks']))" "$BENCH/bench.json")
MODELS=("stage1=$DEMO_DIR/stage1_full")
for S in $SEEDS; do for C in "${CONDITIONS[@]}"; do MODELS+=("${C}_s$S=$DEMO_DIR/stage2/${C}_s$S"); done; done
for ((J = 0; J < DEMO_JOBS; J++)); do
  GROUP=()
  for ((i = J; i < ${#MODELS[@]}; i += DEMO_JOBS)); do GROUP+=("${MODELS[$i]}"); done
  [ ${#GROUP[@]} -gt 0 ] || continue
  pstage "eval_world_$J" "$PYTHON" -m llava.eval.run_many --output_root "$DEMO_DIR/eval" --local_tasks_only "${GROUP[@]}" -- \
                          --tasks "$BENCH_TASKS" --include_path "$BENCH/tasks" --batch_size 16 --verbosity WARNING
done
for S in $SEEDS; do
  trained "$S"
  pstage "linear_probe_s$S" linear_probe "$S" "$RESULTS/seed$S/linear_probe.json" "${TRAINED[@]}"
done
for S in $SEEDS; do
  trained "$S"
  # shellcheck disable=SC2086
  pstage "alignment_s$S"  "$PYTHON" -m analysis.alignment --data "$WORLD/prh/prh.jsonl" \
                          --vision "original=$DEMO_DIR/original" "${TRAINED[@]}" \
                          --language minilm --num_samples "$ALIGN_SAMPLES" --seeds $ALIGN_SEEDS \
                          --output_dir "$RESULTS/seed$S/alignment"
done
pwait

# Loss labels group the bars of Figure 2 (mean ± std over seeds); the controls get bars of their own.
declare -A LOSS_LABEL=([sft]=sft [dpo]=dpo [grpo]=grpo [dpo_frozen]="dpo (frozen tower)" [dpo_flipped]=dpo_sign_flipped)
TOWER_LABEL="\"vision_tower\": \"$(basename "$VISION_MODEL_VERSION")\""
LABELS=()  # analysis.benchmarks labels: lmms-eval's <model> directory -> run (condition) and train_seed
label_eval() {  # label_eval NAME LABELS_JSON
  local results=("$DEMO_DIR/eval/$1"/*/*_results.json)
  LABELS+=("\"$(dirname "${results[0]}")\": $2")
}
label_eval stage1 '{"run": "stage1"}'
LABELS_DIRS=("$DEMO_DIR/eval/stage1")
for S in $SEEDS; do
  for C in "${CONDITIONS[@]}"; do
    label_eval "${C}_s$S" "{\"run\": \"$C\", \"train_seed\": $S, \"loss_type\": \"${LOSS_LABEL[$C]}\", $TOWER_LABEL}"
    LABELS_DIRS+=("$DEMO_DIR/eval/${C}_s$S")
  done
done
(IFS=,; echo "{${LABELS[*]}}") > "$DEMO_DIR/eval/labels.json"
stage world_table       "$PYTHON" -m analysis.benchmarks "${LABELS_DIRS[@]}" --suite world \
                          --labels "$DEMO_DIR/eval/labels.json" --out_dir "$RESULTS/benchmarks"

for S in $SEEDS; do
  OUT=$RESULTS/seed$S
  stage "label_s$S"       "$PYTHON" -m analysis.results_rows "$OUT"/linear_probe*.json "$OUT"/seg_probe*.json \
                          "$OUT"/alignment/*.json --set train_seed="$S"
done
stage report            "$PYTHON" -m analysis.report "$RESULTS" "$DEMO_DIR/report" --title "pivot miniature run ($DEMO_SCALE)" \
                          --caveat "A miniature run of tiny models on a synthetic world ($DEMO_SCALE scale, Stage-2 seeds: $SEEDS, controls: $DEMO_CONTROLS), made to show the whole pipeline working on CPU. It is not the paper's result; each claim's verdict below is computed from these numbers, whatever they turn out to be."
stage metrics           "$PYTHON" -m analysis.summary "$DEMO_DIR" --out "$DEMO_DIR/metrics.json"
cpu_now
echo "[demo] finished in $((SECONDS - START)) s (cpu $CPU s; load average now: $(cut -d' ' -f1-3 /proc/loadavg)). Report: $DEMO_DIR/report/report.md  metrics: $DEMO_DIR/metrics.json"
