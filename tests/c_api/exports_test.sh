#!/usr/bin/env bash
# Checks that libtidepool.so exports the C API and nothing else: every defined dynamic symbol
# starts with tidepool_, and the calls of tidepool.h are all there. Argument: the library.
set -euo pipefail
library="$1"
exported="$(nm -D --defined-only "$library" | awk '{print $3}')"
others="$(grep -v '^tidepool_' <<<"$exported" || true)"
if [ -n "$others" ]; then
  echo "exports_test: $library exports symbols outside the C API:" >&2
  echo "$others" >&2
  exit 1
fi
for function in tidepool_api_version tidepool_last_error tidepool_init_simulated \
    tidepool_malloc tidepool_free tidepool_record_stream tidepool_empty_cache \
    tidepool_begin_allocate_current_thread_to_pool tidepool_begin_allocate_to_pool \
    tidepool_end_allocate_to_pool tidepool_release_pool tidepool_create_callback_pool \
    tidepool_trim_pool tidepool_pool_of tidepool_stats_json tidepool_snapshot_json \
    tidepool_capture_begin tidepool_capture_end tidepool_capture_abandon tidepool_capture_pool \
    tidepool_graph_launch tidepool_graph_pool tidepool_graph_destroy \
    tidepool_graph_pool_create; do
  if ! grep -qx "$function" <<<"$exported"; then
    echo "exports_test: $library does not export $function" >&2
    exit 1
  fi
done
echo "exports_test: $(wc -l <<<"$exported") symbols, all tidepool_*"
