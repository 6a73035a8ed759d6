#!/usr/bin/env bash
# The GPU check (issue 24): a Llama-3.2-1B-shaped random model pruned on CUDA in bfloat16, in memory and with
# --offload, against the same model pruned on the CPU in float32 (kept units, logits, scoring/refit time against
# one forward pass, peak GPU memory). Writes bench/results/gpu_check.{json,md}; exit 1 where a check fails.
# Without CUDA it prints one line and exits 0. Options go to bench/gpu_check.py (--help lists them).
#
#     bash bench/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TQDM_DISABLE=1
export PYTHONPATH="$PWD/src:$PWD/bench${PYTHONPATH:+:$PYTHONPATH}"
LIMIT_S=600

if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
    echo "gpu_check: skipped: no CUDA (nvidia-smi finds no GPU)"
    exit 0
fi
if ! python -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    echo "gpu_check: skipped: no CUDA ($(python -c 'import torch; print("torch", torch.__version__)' 2>/dev/null \
        || echo 'no torch') sees no GPU; scripts/install.sh installs torch's CPU build: install a CUDA build of it)"
    exit 0
fi
nvidia-smi -L
status=0
timeout "$LIMIT_S" python bench/gpu_check.py "$@" || status=$?
if [ "$status" -eq 124 ]; then
    echo "gpu_check: FAILED: took over $LIMIT_S s (the check is meant to finish in 10 minutes on one GPU)"
fi
exit "$status"
