#!/usr/bin/env bash
# Runs preload_test under LD_PRELOAD=libtidepool_preload.so with the stand-in driver, and checks
# the TIDEPOOL_STATS=1 line it prints at exit. Arguments: the test binary, the interposer, the
# stand-in driver, libtidepool.so.1.
set -euo pipefail
test_binary="$1" preload="$2" stub="$3" library="$4"
absolute() { (cd "$(dirname "$1")" && echo "$(pwd -P)/$(basename "$1")"); }
preload="$(absolute "$preload")"
stub="$(absolute "$stub")"
library_dir="$(dirname "$(absolute "$library")")"
output="$(LD_LIBRARY_PATH="$library_dir" LD_PRELOAD="$preload" TIDEPOOL_LIBCUDA="$stub" \
          TIDEPOOL_STATS=1 "$test_binary" 2>&1)" || { echo "$output"; exit 1; }
echo "$output"
if ! grep -q "tidepool: device 0: [1-9][0-9]* allocations served by tidepool, 2 frees passed" \
    <<<"$output"; then
  echo "preload_test.sh: no TIDEPOOL_STATS line with the served and passed counts" >&2
  exit 1
fi
