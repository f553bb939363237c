#!/usr/bin/env bash
# Checks that a shipped library stands alone and exports the C API only:
#   * its dynamic section needs nothing but the C and C++ runtimes and the loader (libc, libm,
#     libstdc++, libgcc_s, libdl, libpthread, librt, ld-linux): no Abseil, no CUDA (libcuda is
#     opened at run time), so it loads on any host with a driver;
#   * every symbol it exports (global or weak binding) starts with tidepool_, so it loads into a
#     process that carries its own Abseil or its own copy of anything tidepool uses (local
#     symbols the linker keeps in the dynamic table, such as hidden thread-locals, are not
#     exported);
#   * the calls of tidepool.h are all there.
# Argument: the library.
set -euo pipefail
library="$1"
needed="$(readelf -d "$library" | sed -n 's/.*(NEEDED).*\[\(.*\)\]/\1/p')"
others="$(grep -vxE 'lib(c|m|stdc\+\+|gcc_s|dl|pthread|rt)\.so\.[0-9]+|ld-linux-x86-64\.so\.2' \
    <<<"$needed" || true)"
if [ -n "$others" ]; then
  echo "exports_test: $library needs libraries beyond the C and C++ runtimes:" >&2
  echo "$others" >&2
  exit 1
fi
# nm's type letter is upper case for global and weak symbols, lower case for local ones.
exported="$(nm -D --defined-only "$library" | awk '$2 ~ /^[A-Z]$/ {print $3}')"
others="$(grep -v '^tidepool_' <<<"$exported" || true)"
if [ -n "$others" ]; then
  echo "exports_test: $library exports symbols outside the C API:" >&2
  echo "$others" >&2
  exit 1
fi
for function in tidepool_api_version tidepool_last_error tidepool_init_simulated \
    tidepool_malloc tidepool_free tidepool_free_async tidepool_record_stream tidepool_empty_cache \
    tidepool_begin_allocate_current_thread_to_pool tidepool_begin_allocate_to_pool \
    tidepool_end_allocate_to_pool tidepool_release_pool tidepool_create_callback_pool \
    tidepool_trim_pool tidepool_pool_of tidepool_stats_json tidepool_snapshot_json \
    tidepool_capture_begin tidepool_capture_end tidepool_capture_abandon tidepool_capture_pool \
    tidepool_graph_launch tidepool_graph_pool tidepool_graph_destroy \
    tidepool_graph_pool_create tidepool_symmetric_pool_create tidepool_symmetric_pool_reserve \
    tidepool_symmetric_pool_trim tidepool_symmetric_pool_destroy tidepool_symmetric_lookup \
    tidepool_symmetric_begin tidepool_symmetric_end; do
  if ! grep -qx "$function" <<<"$exported"; then
    echo "exports_test: $library does not export $function" >&2
    exit 1
  fi
done
echo "exports_test: needs $(tr '\n' ' ' <<<"$needed");" \
  "exports $(wc -l <<<"$exported") symbols, all tidepool_*"
