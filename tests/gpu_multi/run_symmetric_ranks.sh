#!/usr/bin/env bash
# Symmetric NCCL pools across real ranks (issue 15), both layouts, on a GPU host from the bundle
# of tools/gather_gpu_tests.sh (run there as ./run_symmetric_ranks.sh):
#   1. one process per GPU: RANKS processes of symmetric_ranks_test "[processes]", each with
#      TIDEPOOL_RANK / TIDEPOOL_RANKS and a fresh folder for the NCCL unique ids; each process's
#      output goes to its own log, printed after it ends, with its own exit status;
#   2. one process driving every GPU: symmetric_ranks_test "[local]".
#
#   ./run_symmetric_ranks.sh [RANKS]      (default: every GPU nvidia-smi lists)
#
# Nothing is killed by name: each rank ends by its own timeouts (the agreement's 5 to 30 s, the
# unique id's 60 s); `timeout` (the launcher's own child, by its pid) bounds a process that would
# not, and says so. Exits non-zero if any process failed. NCCL: TIDEPOOL_NCCL_LIBRARY, else the
# NCCL in PyTorch's site-packages; NCCL_NVLS_ENABLE=0 always (no multicast objects).
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
binary="$here/symmetric_ranks_test"
ranks="${1:-$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ')}"
if [ -z "$ranks" ] || [ "$ranks" -lt 1 ]; then
  echo "run_symmetric_ranks: no GPU found (nvidia-smi -L)" >&2
  exit 2
fi
export NCCL_NVLS_ENABLE=0
if [ -z "${TIDEPOOL_NCCL_LIBRARY:-}" ] && command -v python3 >/dev/null 2>&1; then
  site="$(python3 -c 'import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))' \
          2>/dev/null || true)"
  [ -n "$site" ] && [ -f "$site/nvidia/nccl/lib/libnccl.so.2" ] &&
    export TIDEPOOL_NCCL_LIBRARY="$site/nvidia/nccl/lib/libnccl.so.2"
fi
[ "$ranks" -lt 2 ] && echo "run_symmetric_ranks: only $ranks GPU: one rank, divergence skipped"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
failed=0

echo "=== one process per GPU: $ranks processes"
pids=()
for ((rank = 0; rank < ranks; rank++)); do
  TIDEPOOL_RANK=$rank TIDEPOOL_RANKS=$ranks TIDEPOOL_NCCL_ID_DIR="$work" \
    timeout 300 "$binary" "[processes]" >"$work/rank$rank.log" 2>&1 &
  pids+=($!)
done
for ((rank = 0; rank < ranks; rank++)); do
  wait "${pids[$rank]}"
  status=$?
  echo "--- rank $rank: exit status $status$([ $status -eq 124 ] && echo ' (timed out)')"
  cat "$work/rank$rank.log"
  [ $status -eq 0 ] || failed=1
done

echo "=== one process driving $ranks GPUs"
TIDEPOOL_RANKS=$ranks timeout 300 "$binary" "[local]"
status=$?
echo "--- one process: exit status $status"
[ $status -eq 0 ] || failed=1

[ $failed -eq 0 ] && echo "PASS symmetric ranks, both layouts, $ranks GPU(s)" ||
  { echo "FAIL symmetric ranks"; exit 1; }
