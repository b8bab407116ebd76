#!/usr/bin/env bash
# Every GPU check in one run (a lent GPU's time is short): the CUDA tests, the training-throughput
# table with sparsify side by side, the step profile at both sizes, the largest n_latents per width.
# Runs with the machine's own python (torch + triton); the peers' pure-Python packages come from
# PEERS_PATH (a folder holding sparsify and its small dependencies). Outputs go to OUT (default out/).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks:${PEERS_PATH:-}"
section() { echo; echo "== $* ($(date +%T))"; }

section device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

section "CUDA tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider tests/test_triton_kernels.py tests/test_precision.py \
    tests/test_model.py 2>&1 | tee "$OUT/tests.txt" | tail -8

section "training throughput (saeflow variants and sparsify)"
timeout 200 $PY benchmarks/train_throughput.py --steps 50 --peers --peer-impls sparsify --peers-python "$PY" \
    2>&1 | tee "$OUT/throughput.txt"

for size in "--d 768 --n 32768" "--d 256 --n 4096"; do
    section "step profile $size"
    timeout 60 $PY benchmarks/step_profile.py $size --rows 14 2>&1 | tee -a "$OUT/profile.txt" | grep -v "^-\|^$"
done

section "largest n_latents"
timeout 140 $PY benchmarks/max_latents.py --d 768,2304 --start 262144 --max 2097152 --steps 3 2>&1 | tee "$OUT/max_latents.txt"
section done
