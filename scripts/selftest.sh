#!/usr/bin/env bash
# Build csrc/selftest.cu (the runtime core without Python) against the installed torch's c10, run it,
# then run it under compute-sanitizer's memcheck, racecheck and synccheck. Needs nvcc and a GPU.
#   bash scripts/selftest.sh [threads] [calls]
set -uo pipefail
PY=${PYTHON:-python3}
THREADS=${1:-4}
CALLS=${2:-2000}
TORCH=$($PY -c 'import os, torch; print(os.path.dirname(torch.__file__))')
ABI=$($PY -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
BIN=${SELFTEST_BIN:-/tmp/torchtrt_ext_selftest}
nvcc -std=c++17 -O2 -gencode arch=compute_90,code=sm_90 -DTORCHTRT_EXT_WITH_CUDA -D_GLIBCXX_USE_CXX11_ABI="$ABI" \
  -I"$TORCH/include" -I"$TORCH/include/torch/csrc/api/include" csrc/selftest.cu \
  -L"$TORCH/lib" -lc10_cuda -lc10 -cudart shared -Xlinker -rpath,"$TORCH/lib" -o "$BIN" || exit 1
"$BIN" "$THREADS" "$CALLS"
echo "selftest rc=$?"
for tool in memcheck racecheck synccheck; do
  timeout "${SANITIZE_TIMEOUT:-180}" compute-sanitizer --tool "$tool" --error-exitcode 9 "$BIN" 3 200
  echo "$tool rc=$?"
done
