#!/usr/bin/env bash
# Runs preload_test under LD_PRELOAD=libtidepool_preload.so with the stand-in driver, and checks
# the TIDEPOOL_STATS=1 line it prints at exit and the trace TIDEPOOL_TRACE recorded. Arguments: the test binary, the interposer, the
# stand-in driver, libtidepool.so.1.
set -euo pipefail
test_binary="$1" preload="$2" stub="$3" library="$4"
absolute() { (cd "$(dirname "$1")" && echo "$(pwd -P)/$(basename "$1")"); }
preload="$(absolute "$preload")"
stub="$(absolute "$stub")"
library_dir="$(dirname "$(absolute "$library")")"
trace="${TEST_TMPDIR:-/tmp}/preload_trace.csv"
rm -f "$trace"
output="$(LD_LIBRARY_PATH="$library_dir" LD_PRELOAD="$preload" TIDEPOOL_LIBCUDA="$stub" \
          TIDEPOOL_STATS=1 TIDEPOOL_TRACE="$trace" "$test_binary" 2>&1)" ||
  { echo "$output"; exit 1; }
echo "$output"
if ! grep -q "tidepool: device 0: [1-9][0-9]* allocations served by tidepool, 2 frees passed" \
    <<<"$output"; then
  echo "preload_test.sh: no TIDEPOOL_STATS line with the served and passed counts" >&2
  exit 1
fi
# Every allocation the interposer served is in the trace (`tidepool replay` reads it).
allocations="$(grep -c ',allocate,' "$trace" || true)"
echo "trace: $allocations allocations recorded in $trace"
if [ "${allocations:-0}" -lt 5 ]; then
  echo "preload_test.sh: TIDEPOOL_TRACE recorded $allocations allocations, expected at least 5" >&2
  exit 1
fi
