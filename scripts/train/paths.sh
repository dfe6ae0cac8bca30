# Sourced by every training script first, before it changes to the repository root (no side effects).
# pivot_caller_paths VAR...: each VAR the caller set to a relative path is made absolute against the caller's
# working directory, so `DATA_PATH=data.json bash /elsewhere/scripts/train/sft.sh` reads ./data.json. Model
# variables (LLM_VERSION, VISION_MODEL_VERSION) may also be preset names or hub ids: they change only when the
# relative path exists. Defaults the scripts set afterwards stay relative to the repository root.
pivot_caller_paths() {
  local name value
  for name in "$@"; do
    value=${!name:-}
    [ -z "$value" ] || [[ "$value" == /* ]] && continue
    case "$name" in
      *_VERSION) [ -e "$value" ] || continue ;;
    esac
    printf -v "$name" '%s' "$PWD/$value"
  done
}

# Stage 2 (sft.sh, dpo.sh): MODEL_ARGS and MODEL_NAME (what the output is named after) from the Stage-1
# checkpoint CKPT_PATH, which must exist, or with FROM_SCRATCH=1 from LLM_VERSION + VISION_MODEL_VERSION.
pivot_stage2_model() {
  if [ "${FROM_SCRATCH:-0}" = "1" ]; then
    MODEL_ARGS=(--llm "$LLM_VERSION" --vision_tower "$VISION_MODEL_VERSION")
    MODEL_NAME="$(basename "$LLM_VERSION")_$(basename "$VISION_MODEL_VERSION")"
  elif [ -d "$CKPT_PATH" ]; then
    MODEL_ARGS=(--model_name_or_path "$CKPT_PATH")
    MODEL_NAME=$(basename "$CKPT_PATH")
    case "$MODEL_NAME" in
      checkpoint-*) MODEL_NAME="$(basename "$(dirname "$CKPT_PATH")")_$MODEL_NAME" ;;
    esac
  else
    echo "no Stage-1 checkpoint at CKPT_PATH=$CKPT_PATH: run stage1_full.sh first or fix CKPT_PATH; FROM_SCRATCH=1 builds an untrained LLM_VERSION + VISION_MODEL_VERSION instead" >&2
    return 2
  fi
}
