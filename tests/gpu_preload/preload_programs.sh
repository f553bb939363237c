#!/usr/bin/env bash
# The interposer on real programs (run on the GPU host from the bundle, by run_gpu_tests.sh):
# preload_program.cu built with nvcc twice, default flags (static cudart) and -cudart shared, each
# run under LD_PRELOAD=libtidepool_preload.so with TIDEPOOL_STATS=1. Passes when both print no
# FAIL, exit 0, and their stats line shows tidepool served allocations. Needs nvcc (on PATH or in
# /usr/local/cuda/bin).
set -uo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
preload="$here/installed/lib/libtidepool_preload.so"
source="$here/tests/preload_program.cu.txt"
nvcc="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0
for variant in static shared; do
  flags=()
  [ "$variant" = shared ] && flags=(-cudart shared)
  cp "$source" "$work/program.cu"
  if ! "$nvcc" -O2 "${flags[@]}" -o "$work/program_$variant" "$work/program.cu"; then
    echo "FAIL nvcc ($variant)"
    failed=1
    continue
  fi
  start=$(date +%s%N)
  output="$(LD_PRELOAD="$preload" TIDEPOOL_STATS=1 "$work/program_$variant" 2>&1)"
  status=$?
  end=$(date +%s%N)
  echo "--- $variant cudart, under the interposer ($(( (end - start) / 1000000 )) ms)"
  echo "$output"
  if [ $status -ne 0 ] || grep -q "^FAIL" <<<"$output" ||
      ! grep -q "tidepool: device 0: [1-9][0-9]* allocations served by tidepool" <<<"$output"; then
    echo "FAIL $variant cudart under the interposer"
    failed=1
  fi
done
# What the interposer costs: the same pair under it and without it (a benchmark: printed only).
cp "$here/tests/preload_bench.cu.txt" "$work/bench.cu"
if "$nvcc" -O2 -o "$work/bench" "$work/bench.cu"; then
  echo "--- cost, under the interposer"
  LD_PRELOAD="$preload" "$work/bench" || failed=1
  echo "--- cost, CUDA's own cudaMallocAsync (no interposer)"
  "$work/bench" || failed=1
fi
[ $failed -eq 0 ] && echo "PASS both programs" || exit 1
