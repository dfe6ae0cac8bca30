#!/usr/bin/env bash
# The GPU acceptance run of issue 9 on one CUDA machine, in one command: the GPU-only tests (bf16 parity,
# flash-attention path, ZeRO-3 save/export/parameter groups on CUDA), the ZeRO-3 tests of
# tests/test_distributed.py, and the throughput table at the paper's sizes (benchmarks/throughput.py).
# Everything lands in OUT_DIR: nvidia-smi.txt, env.txt, pytest.log, throughput.log, throughput.json.
# Each part runs even when an earlier one fails; the exit status is non-zero if any part failed.
#   PYTHON=.venv/bin/python bash benchmarks/gpu_checks.sh
#   THROUGHPUT_ARGS="--configs qwen2.5-0.5b:siglip2-so16 --losses sft" bash benchmarks/gpu_checks.sh
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
OUT_DIR=${OUT_DIR:-runs/gpu_checks}
THROUGHPUT_ARGS=${THROUGHPUT_ARGS:-}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

nvidia-smi >"$OUT_DIR/nvidia-smi.txt" 2>&1 || echo "nvidia-smi failed" >>"$OUT_DIR/nvidia-smi.txt"
"$PYTHON" - >"$OUT_DIR/env.txt" 2>&1 <<'EOF'
import importlib.metadata as md
import torch
print("cuda", torch.cuda.is_available(), torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "")
for name in ("torch", "transformers", "accelerate", "deepspeed", "flash-attn", "trl", "tokenizers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "not installed")
EOF
cat "$OUT_DIR/env.txt"

status=0
{ "$PYTHON" -m pytest -q -rs tests/test_gpu.py && "$PYTHON" -m pytest -q -rs tests/test_distributed.py -k zero3; } \
  2>&1 | tee "$OUT_DIR/pytest.log" || status=1
# shellcheck disable=SC2086
"$PYTHON" benchmarks/throughput.py --json_out "$OUT_DIR/throughput.json" $THROUGHPUT_ARGS \
  2>&1 | tee "$OUT_DIR/throughput.log" || status=1
exit $status
