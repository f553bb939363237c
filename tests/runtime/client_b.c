/* An integration that frees: another client of libtidepool.so's C ABI, loaded beside
 * client_a.c's in the same process. */
#include <stddef.h>

#include "integrations/c_api/tidepool.h"

tidepool_status client_b_free(void* ptr) { return tidepool_free(ptr); }

tidepool_status client_b_pool_of(const void* ptr, int* device) {
  tidepool_pool_id pool;
  return tidepool_pool_of(ptr, device, &pool);
}

void* client_b_resolved_free(void) { return (void*)&tidepool_free; }
