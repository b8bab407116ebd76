#!/usr/bin/env bash
# Every GPU check in one run (a lent GPU's time is short): the training-throughput table with
# sparsify side by side (saeflow's default step, a CUDA graph where it gains, and its eager step), the store's input path, the
# CUDA tests, 1M latents at d 2304 for 100 steps. Runs with the machine's own python (torch + triton); the
# store's packages and the peers' come from PEERS_PATH (a folder holding zarr, dask, sparsify and their
# small dependencies: benchmarks/gpu_wheels.sh fetches them as wheels). Outputs go to OUT (default
# out/). About 5 minutes on an H200; its timeouts add up to 9. FULL=1 adds what earlier runs measured already: the other saeflow variants, the step
# profile, the grids on one GPU and the largest n_latents at d 768.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out}; mkdir -p "$OUT"
PY=${PY:-python3}
FULL=${FULL:-0}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD:$PWD/benchmarks:${PEERS_PATH:-}"
section() { echo; echo "== $* ($(date +%T))"; }

section device
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
$PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

section "training throughput (saeflow's default step, its eager step, sparsify)"
IMPLS=saeflow,saeflow-eager
[ "$FULL" = 1 ] && IMPLS=saeflow,saeflow-eager,saeflow-foreach,saeflow-fused,saeflow-adam
timeout 200 $PY benchmarks/train_throughput.py --steps 50 --impls "$IMPLS" --peers --peer-impls sparsify \
    --peers-python "$PY" 2>&1 | tee "$OUT/throughput.txt"

section "the input path: the store's reader and training from it at d 768 (the GPU target: 90% of in-memory)"
timeout 120 $PY benchmarks/data_path.py --d 768 --latents 32768 --tokens 524288 --seconds 4 2>&1 | tee "$OUT/data_path.txt"

section "CUDA tests"
timeout 120 $PY -m pytest -q -p no:cacheprovider -rfE --tb=short tests/test_cuda_graph.py tests/test_triton_kernels.py \
    tests/test_precision.py tests/test_model.py tests/test_activations.py > "$OUT/tests.txt" 2>&1
tail -25 "$OUT/tests.txt"

section "1,048,576 latents at d 2304 for 100 steps in one GPU's memory"
timeout 100 $PY benchmarks/max_latents.py --d 2304 --start 1048576 --max 1048576 --steps 100 2>&1 | tee "$OUT/max_latents.txt"
if [ "$FULL" = 1 ]; then
    section "step profile d 768"
    timeout 45 $PY benchmarks/step_profile.py --d 768 --n 32768 --rows 14 2>&1 | tee "$OUT/profile.txt" | grep -v "^-\|^$"
    section "grids on one GPU (1x1 NCCL; more ranks share the GPU over gloo)"
    timeout 90 $PY benchmarks/distributed_throughput.py --grids 1x1,1x2,2x1 --d 768 --n 32768 --batch 4096 --steps 10 \
        2>&1 | tee "$OUT/grid.txt"
    section "largest n_latents at d 768"
    timeout 100 $PY benchmarks/max_latents.py --d 768 --start 2097152 --max 4194304 --steps 3 2>&1 | tee "$OUT/max_latents_768.txt"
fi
section done
