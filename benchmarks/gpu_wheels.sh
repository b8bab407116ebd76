#!/usr/bin/env bash
# The wheels benchmarks/gpu_check.sh needs on a lent GPU machine that has torch, triton, numpy,
# transformers and pyarrow but not the store's packages nor sparsify (it reaches no registry). Run
# here, then carry .whl/ and install it there first:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
#     && PEERS_PATH=/tmp/site PY=python3 bash benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    zarr==3.1.6 numcodecs==0.16.6 donfig==0.8.1.post1 google-crc32c==1.9.0 dask==2026.8.0 partd locket \
    eai-sparsify==1.3.3 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 natsort schedulefree \
    simple-parsing docstring-parser
du -sh .whl
