#!/usr/bin/env bash
# The training-step comparison (benchmarks/train_step.py) on a CUDA GPU, in one short call.
#
#   benchmarks/gpu.sh                       # all configurations on cuda (~3-5 min)
#   benchmarks/gpu.sh --only lora           # extra arguments go to train_step.py
#   DEVICE=cpu benchmarks/gpu.sh --quick    # the same script on the CPU (to check it)
#
# Environment: PYTHON (default: .venv/bin/python if its torch sees CUDA, else python3),
# DEVICE (default cuda), RESULTS_DIR (default $OUT when set, else benchmarks/results).
# Writes train_step_<device>.json and .png there; the JSON names the GPU (rows[].gpu).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-cuda}"
RESULTS_DIR="${RESULTS_DIR:-${OUT:-benchmarks/results}}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

has_device() {  # has_device PYTHON: its torch imports and sees $DEVICE
    "$1" - "$DEVICE" <<'EOF' >/dev/null 2>&1
import sys
import torch
device = sys.argv[1]
sys.exit(0 if device == "cpu" or (device.startswith("cuda") and torch.cuda.is_available()) else 1)
EOF
}

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    for candidate in .venv/bin/python python3; do
        if command -v "$candidate" >/dev/null 2>&1 && has_device "$candidate"; then
            PY="$candidate"
            break
        fi
    done
fi
if [ -z "$PY" ]; then
    echo "gpu.sh: no Python whose torch sees device '$DEVICE' (set PYTHON=...)" >&2
    exit 2
fi

"$PY" - "$DEVICE" <<'EOF'
import importlib, sys
import torch
device = sys.argv[1]
missing = [m for m in ("transformers", "peft", "bitsandbytes", "safetensors")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"gpu.sh: missing packages {missing}; install minituner with the hf and bench extras")
name = torch.cuda.get_device_name(0) if device.startswith("cuda") else "cpu"
print(f"gpu.sh: torch {torch.__version__}, device {device} ({name})", flush=True)
EOF

mkdir -p "$RESULTS_DIR"
tag="${DEVICE//:/_}"
PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" "$PY" benchmarks/train_step.py \
    --device "$DEVICE" \
    --out "$RESULTS_DIR/train_step_${tag}.json" \
    --plot "$RESULTS_DIR/train_step_${tag}.png" \
    "$@"
