#!/usr/bin/env bash
# The project's one GPU script: build the CUDA runtime, run the GPU tests and the benchmarks, and write
# everything under OUT_DIR (logs, JSON, tables). Steps run in the order given; default: all of them.
#
#   bash scripts/gpu.sh OUT_DIR [build] [tests] [bench] [stress] [selftest] [sanitize]
#   TESTS="tests/a.py ..." picks the test files; BENCHMARKS="name:timeout_s ..." the benchmarks;
#   BENCH_ARGS="--quick" runs their smallest cases only; TEST_JOBS=N runs N test files at once (logs in
#   OUT_DIR/tests/).
#
# Each step's log lands in OUT_DIR; the last lines printed summarise every step (the device tool
# returns the end of the output).
set -uo pipefail
OUT=${1:?usage: scripts/gpu.sh OUT_DIR [steps...]}
shift
STEPS=${*:-build tests selftest bench}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
SUMMARY=()
step() { # name, command...: run, log to OUT/name.log, remember the outcome
  local name=$1; shift
  local start=$SECONDS
  echo "=== $name: $*"
  "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  SUMMARY+=("$name rc=$rc $((SECONDS - start))s")
  return "$rc"
}

for s in $STEPS; do
  case $s in
    build)
      {
        nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
        $PY -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
        $PY -m pip --version
        command -v nvcc && nvcc --version | tail -2
        echo "CUDA_HOME=${CUDA_HOME:-unset}"
      } > "$OUT/env.log" 2>&1
      step build $PY -m pip install --no-build-isolation --no-deps -e . || { echo "build failed"; break; }
      $PY -c "from torchtrt_ext.core import runtime as r; assert r.built_with_cuda, 'CPU build on a GPU machine'; print('runtime built with CUDA')" \
        || { echo "runtime check failed"; break; } ;;
    tests)  # one pytest per file, TEST_JOBS files at a time (the slowest first): a crash in one file cannot hide the others
      run_test_file() { # file: its own log under OUT/tests/, then one line with its outcome
        local log="$OUT/tests/$(basename "$1" .py).log" start=$SECONDS
        $PY -m pytest -q -m cuda -p no:cacheprovider --tb=short -rfE "$1" > "$log" 2>&1
        echo "--- $1 rc=$? $((SECONDS - start))s: $(tail -1 "$log")"
        grep -E "^(FAILED|ERROR)" "$log" | cut -c1-400 || true  # the failures, where they are seen
        # the first failure's traceback too: the device returns only a few files, and the output's tail
        sed -n '/^=* \(FAILURES\|ERRORS\) =*$/,/^=* short test summary/p' "$log" | grep -v -E "Warning|warn|^DEBUG" | head -30 || true
        grep -m 12 "^E " "$log" | cut -c1-300 || true  # the errors themselves (a long traceback hides them)
      }
      export -f run_test_file; export OUT PY
      mkdir -p "$OUT/tests"
      step tests bash -c "printf '%s\n' ${TESTS:-tests/test_dynamo_frames.py tests/test_cuda.py tests/test_streaming.py tests/test_refit.py tests/test_wrapper.py tests/test_backend.py tests/test_streams.py tests/test_refit_hot.py tests/test_files.py tests/test_file_integrity.py tests/test_runtime_leaks.py tests/test_wrapper_module.py tests/test_quantized_cuda.py tests/test_quantized_streaming_cuda.py tests/test_bart_graphs_cuda.py tests/test_quantized_models_cuda.py} \
        | xargs -P ${TEST_JOBS:-1} -I{} bash -c 'run_test_file {}'; ! grep -l -E '^(FAILED|ERROR)|[0-9]+ (failed|error)' $OUT/tests/*.log"
      ;;
    bench)  # one process per benchmark (a failure cannot poison the next), each with a time limit;
            # BENCHMARKS entries are name:timeout_s[:extra-args], e.g. streaming:300:--quick
      step bench bash -c "for b in ${BENCHMARKS:-engine_llama:240 engine_resnet50:200 streams:100 refit:200 streaming:450 files:300 engine_cache:420}; do \
        IFS=: read -r name limit extra <<< \"\$b\"; echo \"--- \$name (\$SECONDS s into the bench step)\"; \
        timeout \$limit $PY -m benchmarks \$name --out $OUT ${BENCH_ARGS:-} \$extra; echo \"\$name rc=\$?\"; done" ;;
    stress)
      step stress $PY -m tests.stress_streams --calls 10000 --threads 4 ;;
    selftest)  # the runtime core without Python, plain and under compute-sanitizer (memcheck, racecheck, synccheck)
      step selftest bash scripts/selftest.sh 4 2000 ;;
    sanitize)  # the Python runtime under compute-sanitizer: slow to start (torch's kernels get instrumented)
      step sanitize bash -c "\
        for tool in memcheck racecheck; do echo \"--- \$tool\"; \
        timeout ${SANITIZE_TIMEOUT:-240} compute-sanitizer --tool \$tool --target-processes application-only --error-exitcode 9 \
        $PY -m tests.sanitize_runtime; echo \"\$tool rc=\$?\"; done" ;;
    *) echo "unknown step $s"; exit 2 ;;
  esac
done
echo "=== summary"
printf '%s\n' "${SUMMARY[@]}"
