#!/usr/bin/env bash
# The numerics-heavy tests a second time under another CPU dispatch and thread count, to catch a
# test that encodes one CPU's kernels (float32 results differ in the last bits between oneDNN/BLAS
# kernels). The first pass (scripts/test.sh) runs the native dispatch on 2 xdist workers of one
# torch thread each; this pass forces the AVX2 kernels of MKL, oneDNN, ATen and OpenBLAS and runs in
# one process with 2 torch threads. Called by .ci/run after scripts/test.sh (which set up .venv).
# Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
export MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 OPENBLAS_CORETYPE=Haswell
export OMP_NUM_THREADS=2
exec "$ROOT/.venv/bin/python" -m pytest -p no:xdist -q \
    tests/test_diffusion_*.py tests/test_models_*.py tests/test_features.py tests/test_stats_fid.py \
    tests/test_prdc.py tests/test_nll.py tests/test_scaling.py tests/test_sample.py tests/test_train.py \
    "$@"
