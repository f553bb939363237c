/* An integration that allocates: a stand-in for any library that is a client of libtidepool.so's
 * C ABI (the preload library, the PyTorch allocator, CuPy's hook). It links nothing of tidepool;
 * tidepool_* resolve, when it is loaded, to libtidepool.so's (docs/design.md, "One runtime per
 * process"). */
#include <stddef.h>

#include "integrations/c_api/tidepool.h"

void* client_a_malloc(size_t size) {
  void* ptr = NULL;
  if (tidepool_malloc(&ptr, size, 0, NULL) != TIDEPOOL_OK) return NULL;
  return ptr;
}

tidepool_status client_a_free(void* ptr) { return tidepool_free(ptr); }

/* The tidepool_malloc this library calls, for the test to compare with libtidepool.so's. */
void* client_a_resolved_malloc(void) { return (void*)&tidepool_malloc; }
