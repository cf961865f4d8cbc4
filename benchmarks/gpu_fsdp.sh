#!/usr/bin/env bash
# FSDP2 vs DDP vs one process (benchmarks/fsdp_memory.py) on N GPUs with NCCL, in one call.
#
#   benchmarks/gpu_fsdp.sh                  # N = every visible GPU, device cuda (NCCL)
#   N=1 benchmarks/gpu_fsdp.sh              # one GPU: FSDP shards nothing (a baseline)
#   DEVICE=cpu N=2 benchmarks/gpu_fsdp.sh   # the same script with gloo on the CPU (to check it)
#   PYTHON=/path/to/venv/bin/python ...     # when .venv is not in this checkout
#
# Checked on CPU: DEVICE=cpu N=1 and DEVICE=cpu N=2 both finish (2-3 minutes each; the numbers
# are in the README's FSDP section). On CUDA each run reports peak allocated memory.
# Measures, per process: the base-weight bytes held after a step (FSDP: its shard), the peak
# memory growth (CUDA: peak allocated; CPU: peak RSS) and, in the runs' results.json, the
# step time; beside the planner's per-device prediction. Extra arguments go to fsdp_memory.py
# (e.g. --steps 10 --batch 8 --seq 256). Writes fsdp_memory_<device>.json to RESULTS_DIR
# (default $OUT when set, else benchmarks/results).
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE="${DEVICE:-cuda}"
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
RESULTS_DIR="${RESULTS_DIR:-${OUT:-benchmarks/results}}"
if [ -z "${N:-}" ]; then
    if [ "$DEVICE" = cpu ]; then N=2; else N=$("$PY" -c "import torch; print(torch.cuda.device_count())"); fi
fi
if [ "$N" -lt 1 ]; then
    echo "gpu_fsdp.sh: no GPU visible (DEVICE=cpu runs it on the CPU)" >&2
    exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$RESULTS_DIR"
exec "$PY" benchmarks/fsdp_memory.py --device "$DEVICE" --processes "$N" \
    --out-json "$RESULTS_DIR/fsdp_memory_${DEVICE}.json" "$@"
