# Shared by every training script (sourced, not run): distributed settings, batch arithmetic, launch.
# Variables (override from the environment): NUM_GPUS NNODES RANK ADDR PORT GLOBAL_BATCH PER_DEVICE_BATCH
# DEEPSPEED PYTHON LAUNCHER DDP_TIMEOUT HOSTFILE, and LORA LORA_R LORA_ALPHA LORA_DROPOUT LORA_VISION
# (pivot_lora_flags). On a machine without CUDA the run is one plain CPU process (fp32). With GPUs: bf16, gradient checkpointing, DeepSpeed, and the LLM on flash_attention_2
# when flash_attn imports, else sdpa (llava.model.builder.default_attn_implementation).
# Multi-node: run the script on every node with the same NNODES ADDR PORT and that node's RANK (0..NNODES-1).
#   LAUNCHER=torchrun (default): python -m torch.distributed.run.
#   LAUNCHER=deepspeed: the DeepSpeed launcher (python -m deepspeed.launcher.runner); multi-node needs
#   HOSTFILE (DeepSpeed's "host slots=N" lines, default /job/hostfile) and runs per node with --no_ssh.

PYTHON=${PYTHON:-python}
HAS_CUDA=$("$PYTHON" -c "import torch; print(int(torch.cuda.is_available()))")
if [ "$HAS_CUDA" = "1" ]; then
  NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
else
  NUM_GPUS=0
fi
NNODES=${NNODES:-1}
RANK=${RANK:-0}
ADDR=${ADDR:-127.0.0.1}
PORT=${PORT:-29500}
GLOBAL_BATCH=${GLOBAL_BATCH:-256}
PER_DEVICE_BATCH=${PER_DEVICE_BATCH:-4}
SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEEPSPEED=${DEEPSPEED:-$SCRIPTS_DIR/zero3.json}
LAUNCHER=${LAUNCHER:-torchrun}
HOSTFILE=${HOSTFILE:-/job/hostfile}
# Seconds a process may wait at a barrier, e.g. while rank 0 scores the reference log-probs (HF: 1800).
DDP_TIMEOUT=${DDP_TIMEOUT:-10800}
export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
# A failed or hung collective raises instead of blocking forever (older torch reads the NCCL_ name).
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
export NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-1}
export TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
# CPU threads per process: the node's cores shared by its processes (torchrun would set 1).
CORES=$(nproc 2>/dev/null || echo 1)
PROCS_PER_NODE=$(( NUM_GPUS > 0 ? NUM_GPUS : 1 ))
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(( CORES / PROCS_PER_NODE > 0 ? CORES / PROCS_PER_NODE : 1 ))}

# Gradient accumulation so that PER_DEVICE_BATCH x processes x GA = GLOBAL_BATCH exactly.
pivot_grad_accum() {
  local world=$(( (NUM_GPUS > 0 ? NUM_GPUS : 1) * NNODES ))
  local per_step=$(( PER_DEVICE_BATCH * world ))
  if [ $(( GLOBAL_BATCH % per_step )) -ne 0 ]; then
    echo "GLOBAL_BATCH=$GLOBAL_BATCH is not a multiple of PER_DEVICE_BATCH=$PER_DEVICE_BATCH x $world processes" >&2
    return 1
  fi
  echo $(( GLOBAL_BATCH / per_step ))
}

# Sets LAUNCH_CMD to the launcher command of this node's GPU processes, up to the module to run.
pivot_launcher() {
  case "$LAUNCHER" in
    torchrun)
      LAUNCH_CMD=("$PYTHON" -m torch.distributed.run --nproc_per_node="$NUM_GPUS" --nnodes="$NNODES"
        --node_rank="$RANK" --master_addr="$ADDR" --master_port="$PORT" -m)
      ;;
    deepspeed)
      LAUNCH_CMD=("$PYTHON" -m deepspeed.launcher.runner --num_gpus="$NUM_GPUS" --master_addr="$ADDR"
        --master_port="$PORT" --no_local_rank)
      if [ "$NNODES" -gt 1 ]; then
        if [ ! -f "$HOSTFILE" ]; then
          echo "LAUNCHER=deepspeed with NNODES=$NNODES needs HOSTFILE (not found: $HOSTFILE)" >&2
          return 1
        fi
        LAUNCH_CMD+=(--hostfile="$HOSTFILE" --no_ssh --node_rank="$RANK" --num_nodes="$NNODES")
      fi
      LAUNCH_CMD+=(--module)
      ;;
    *)
      echo "LAUNCHER=$LAUNCHER: choose torchrun or deepspeed" >&2
      return 1
      ;;
  esac
}

# Run llava.train.train with the given arguments: torchrun/deepspeed + DeepSpeed + bf16 on GPUs,
# plain python on CPU.
pivot_launch() {
  if [ "$NUM_GPUS" -gt 0 ]; then
    pivot_launcher || return 1
    "${LAUNCH_CMD[@]}" llava.train.train \
      --deepspeed "$DEEPSPEED" --bf16 True --gradient_checkpointing True \
      --gradient_checkpointing_kwargs '{"use_reentrant": false}' --ddp_timeout "$DDP_TIMEOUT" "$@"
  else
    "$PYTHON" -m llava.train.train --use_cpu True "$@"
  fi
}

# The recipe every stage shares (DESIGN §4), from the variables the calling script sets at its top:
# pivot_train STAGE_FLAGS... -- EXTRA_ARGS...  (extra arguments come last, so they override the recipe).
pivot_train() {
  local stage=() ga
  while [ $# -gt 0 ] && [ "$1" != "--" ]; do stage+=("$1"); shift; done
  [ $# -gt 0 ] && shift
  ga=$(pivot_grad_accum)
  pivot_lora_flags || return 1
  pivot_launch "${stage[@]}" "${LORA_FLAGS[@]}" \
    --data_path "$DATA_PATH" --image_folder "$IMAGE_FOLDER" --output_dir "$OUTPUT_DIR" \
    --learning_rate "$LR" --num_train_epochs "$EPOCHS" \
    --per_device_train_batch_size "$PER_DEVICE_BATCH" --per_device_eval_batch_size "$PER_DEVICE_BATCH" \
    --gradient_accumulation_steps "$ga" \
    --lr_scheduler_type cosine --warmup_steps 0.03 --weight_decay 0 --model_max_length 2048 \
    --save_strategy steps --save_steps "$SAVE_STEPS" --logging_steps 1 --report_to "$REPORT_TO" \
    --seed "$SEED" --dataloader_num_workers "$WORKERS" "$@"
}

# The LoRA flags of the LORA* variables a calling script sets in its variable block (none unless LORA=1).
pivot_lora_flags() {
  LORA_FLAGS=()
  case "${LORA:-0}" in
    0) return 0 ;;
    1) ;;
    *) echo "LORA=$LORA: use 1 (train LoRA adapters) or 0" >&2; return 1 ;;
  esac
  local vision=False
  case "${LORA_VISION:-0}" in
    0) ;;
    1) vision=True ;;
    *) echo "LORA_VISION=$LORA_VISION: use 1 (adapt the vision tower too) or 0" >&2; return 1 ;;
  esac
  LORA_FLAGS=(--lora_enable True --lora_r "${LORA_R:-64}" --lora_alpha "${LORA_ALPHA:-16}"
    --lora_dropout "${LORA_DROPOUT:-0.05}" --lora_vision "$vision")
}

# Stage 2 (sft.sh, dpo.sh): reads the variables those scripts set at their top (MODEL_ARGS: paths.sh).
pivot_stage2() {
  echo "[stage2] $LOSS_TYPE: ${MODEL_ARGS[*]} data=$DATA_PATH out=$OUTPUT_DIR gpus=$NUM_GPUS x $NNODES batch=$GLOBAL_BATCH ($PER_DEVICE_BATCH x GA $(pivot_grad_accum))"
  pivot_train "${MODEL_ARGS[@]}" --loss_type "$LOSS_TYPE" --beta "$BETA" --gamma "$GAMMA" --reference "$REFERENCE" \
    --mm_tunable_parts mm_vision_tower,mm_mlp_adapter,mm_language_model -- "$@"
}
