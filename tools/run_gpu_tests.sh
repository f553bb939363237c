#!/usr/bin/env bash
# Runs tidepool's GPU tests on a GPU host that has no Bazel, from the folder that
# tools/gather_gpu_tests.sh filled: every binary in its tests/ folder, one after another, with the
# folder as working directory (so a test finds traces/ where it finds them under Bazel), and the
# PyTorch tests (Python scripts, with the bundle's tidepool package and installed library).
#
#   ./run_gpu_tests.sh [TEST_NAME...]      (default: every test in tests/)
#
# Prints `PASS name` or `FAIL name` per test, the whole output of each failing test, and last a
# line `N passed, M failed`; exits non-zero if any test failed or none was found.
# Environment: TIDEPOOL_TEST_TIMEOUT (seconds per test, default 900); TIDEPOOL_TEST_LOG_DIR (a
# folder to keep every test's whole output in, as NAME.log, passing tests' too: what a closing
# note quotes); TIDEPOOL_LIBCUDA (another
# driver library than libcuda.so.1) and TIDEPOOL_NCCL_LIBRARY (found below when unset) reach the
# tests unchanged.
set -uo pipefail
cd "$(dirname "$0")" || exit 2
# Multicast (NVLS) can put a multi-GPU host's GPUs out of service; no test may turn it on.
export NCCL_NVLS_ENABLE=0
# NCCL for the symmetric-segment tests: the one PyTorch ships in the Python site-packages (the GPU
# host has no other), unless TIDEPOOL_NCCL_LIBRARY names one. Without it those tests fail, saying
# where tidepool looked.
if [ -z "${TIDEPOOL_NCCL_LIBRARY:-}" ] && command -v python3 >/dev/null 2>&1; then
  site="$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))' \
          2>/dev/null || true)"
  if [ -n "$site" ] && [ -f "$site/nvidia/nccl/lib/libnccl.so.2" ]; then
    export TIDEPOOL_NCCL_LIBRARY="$site/nvidia/nccl/lib/libnccl.so.2"
  fi
fi
# The PyTorch tests (Python scripts in tests/) use the bundle's package and installed library.
export PYTHONPATH="$(pwd)/python${PYTHONPATH:+:$PYTHONPATH}"
export TIDEPOOL_LIBRARY="${TIDEPOOL_LIBRARY:-$(pwd)/installed/lib/libtidepool.so.1}"
timeout_s="${TIDEPOOL_TEST_TIMEOUT:-900}"

names=()
if [ $# -gt 0 ]; then
  names=("$@")
else
  for path in tests/*; do
    [ -f "$path" ] && [ -x "$path" ] && names+=("$(basename "$path")")
  done
fi
if [ ${#names[@]} -eq 0 ]; then
  echo "run_gpu_tests: no test binaries in $(pwd)/tests (run tools/gather_gpu_tests.sh first)" >&2
  echo "0 passed, 0 failed"
  exit 2
fi

# `timeout` bounds a test that hangs on the device; run bare where coreutils lack it.
runner=()
command -v timeout >/dev/null 2>&1 && runner=(timeout "$timeout_s")

log="$(mktemp)"
trap 'rm -f "$log"' EXIT
log_dir="${TIDEPOOL_TEST_LOG_DIR:-}"
[ -n "$log_dir" ] && mkdir -p "$log_dir"
passed=0
failed=0
for name in "${names[@]}"; do
  if [ ! -x "tests/$name" ]; then
    echo "FAIL $name"
    echo "    no executable tests/$name in $(pwd)"
    failed=$((failed + 1))
    continue
  fi
  start_s=$SECONDS
  "${runner[@]}" "./tests/$name" >"$log" 2>&1
  status=$?
  [ -n "$log_dir" ] && cp "$log" "$log_dir/$name.log"
  if [ $status -eq 0 ]; then
    echo "PASS $name ($((SECONDS - start_s)) s)"
    passed=$((passed + 1))
  else
    echo "FAIL $name"
    if [ $status -eq 124 ]; then
      echo "    (timed out after ${timeout_s} s)"
    else
      echo "    (exit status $status)"
    fi
    sed 's/^/    /' "$log"
    failed=$((failed + 1))
  fi
done
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
