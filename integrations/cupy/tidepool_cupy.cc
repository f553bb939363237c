// The CuPy entry points (tidepool_cupy.h): thin adapters over tidepool_malloc / tidepool_free,
// so they share the C API's runtime, its error handling and its per-thread last error.
#include "integrations/cupy/tidepool_cupy.h"

#include <cstdio>

namespace {

// Trivially destructible, so it is safe to touch from thread-exit destructors.
thread_local tidepool_status last_status = TIDEPOOL_OK;

}  // namespace

extern "C" {

void* tidepool_cupy_malloc(void* param, size_t size, int device_id) {
  void* ptr = nullptr;
  last_status = tidepool_malloc(&ptr, size, device_id, param);
  return last_status == TIDEPOOL_OK ? ptr : nullptr;
}

void tidepool_cupy_free(void* /*param*/, void* ptr, int /*device_id*/) {
  last_status = tidepool_free(ptr);
  if (last_status != TIDEPOOL_OK) {
    std::fprintf(stderr, "tidepool: tidepool_cupy_free(%p) failed, and the block stays where it "
                 "was: %s\n", ptr, tidepool_last_error());
  }
}

tidepool_status tidepool_cupy_last_status(void) { return last_status; }

}  // extern "C"
