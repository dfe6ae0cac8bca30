# Shared by the probe scripts (sourced, not run): the list of encoders to analyse and the optional
# original-encoder baseline.
#   pivot_encoders ARGS...  reads the leading [NAME=]DIR arguments (or, without any, $ENCODERS) into the
#                           arrays `names` and `paths`, appends the baseline when BASELINE_TOWER is set, and
#                           sets `encoder_argc` to the number of arguments it read (the caller shifts them).
#   pivot_baseline          when BASELINE_TOWER is set, exports it once, exactly as the MLLM reads it
#                           (`python -m llava.export --vision_tower`, no projector), to $BASELINE_DIR.
# Variables: BASELINE_TOWER (preset, hub id or dir; unset = no baseline), BASELINE_NAME (run name, default
# "original"), BASELINE_DIR (default $OUTPUT_DIR/original_encoder), BASELINE_EXPORT_ARGS (the trained runs'
# tower flags, e.g. "--mm_vision_select_layer -2"; default: the builder's, as the training scripts use).

BASELINE_TOWER=${BASELINE_TOWER:-}
BASELINE_NAME=${BASELINE_NAME:-original}
BASELINE_DIR=${BASELINE_DIR:-$OUTPUT_DIR/original_encoder}
BASELINE_EXPORT_ARGS=${BASELINE_EXPORT_ARGS:-}

pivot_baseline() {
  [ -n "$BASELINE_TOWER" ] || return 0
  # shellcheck disable=SC2086  # word splitting of the flag list is intended
  "$PYTHON" -m llava.export --vision_tower "$BASELINE_TOWER" "$BASELINE_DIR" $BASELINE_EXPORT_ARGS
}

pivot_encoders() {
  local -a given=()
  local item
  while [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; do given+=("$1"); shift; done
  encoder_argc=${#given[@]}
  [ ${#given[@]} -gt 0 ] || read -r -a given <<< "$ENCODERS"
  names=(); paths=()
  for item in "${given[@]}"; do
    if [ "${item#*=}" != "$item" ]; then names+=("${item%%=*}"); paths+=("${item#*=}");
    else names+=("$(basename "$item")"); paths+=("$item"); fi
  done
  if [ -n "$BASELINE_TOWER" ]; then
    pivot_baseline
    names+=("$BASELINE_NAME"); paths+=("$BASELINE_DIR")
  fi
}
