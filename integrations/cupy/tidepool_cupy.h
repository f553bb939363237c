// tidepool as CuPy's allocator: the two functions a cupy.cuda.memory.CFunctionAllocator calls,
// built into libtidepool.so.1 so that CuPy's arrays come from the process's one runtime
// (docs/integrations.md). Python installs them with tidepool.cupy.install().
//
// CuPy's contract (cupy/cuda/memory.pyx, CFunctionAllocatorMemory): malloc is
// `void* (*)(void* param, size_t size, int device_id)` and free `void (*)(void* param, void* ptr,
// int device_id)`; CuPy never calls malloc with size 0, calls free once per non-NULL pointer
// malloc gave, and passes no stream. CuPy does NOT raise for a NULL return: it makes an array
// over address 0. The Python side (tidepool.cupy) checks every allocation and raises CuPy's
// OutOfMemoryError, reading the reason from tidepool_cupy_last_status() and
// tidepool_last_error(); C callers must check for NULL themselves.
//
// `param` is the CUstream the block belongs to (NULL: the legacy default stream), as
// tidepool_malloc's `stream`: tidepool.cupy gives each (device, stream) pair its own
// CFunctionAllocator whose param is CuPy's current stream. The stream contract is tidepool.h's:
// the block is usable on that stream, reusable by later work on it as soon as it is freed, and a
// block also used on other streams must be declared with tidepool_record_stream (or those
// streams synchronized) before it is freed.
#ifndef TIDEPOOL_INTEGRATIONS_CUPY_TIDEPOOL_CUPY_H_
#define TIDEPOOL_INTEGRATIONS_CUPY_TIDEPOOL_CUPY_H_

#include <stddef.h>

#include "integrations/c_api/tidepool.h"

#ifdef __cplusplus
extern "C" {
#endif

// tidepool_malloc(&ptr, size, device_id, param): the block, or NULL on any failure (then
// tidepool_cupy_last_status() gives the code and tidepool_last_error() the message, both for
// the calling thread).
void* tidepool_cupy_malloc(void* param, size_t size, int device_id);

// tidepool_free(ptr), whatever the stream or device (tidepool knows both from the pointer).
// NULL does nothing. A failed free (a pointer tidepool does not hold, a double free) leaves
// everything as it was, sets tidepool_cupy_last_status() and prints tidepool's message to
// stderr, since CuPy frees from a destructor that cannot raise.
void tidepool_cupy_free(void* param, void* ptr, int device_id);

// The tidepool_status of the calling thread's latest tidepool_cupy_malloc or tidepool_cupy_free
// (TIDEPOOL_OK before the first).
tidepool_status tidepool_cupy_last_status(void);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TIDEPOOL_INTEGRATIONS_CUPY_TIDEPOOL_CUPY_H_
