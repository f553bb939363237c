// What libtidepool_preload.so (preload.cc) needs from the process's runtime beyond the C API:
// capture marks around captures it did not start, and the bytes tidepool holds but does not use.
// These functions live in libtidepool.so.1 (so the interposer stays a thin layer over the one
// runtime) and are exported with the tidepool_ prefix like the C API, with its conventions (a
// tidepool_status, the message in tidepool_last_error). Only the interposer calls them.
//
// A capture the program begins with cuStreamBeginCapture is seen in three steps:
//   will_begin   before the driver's begin: the device is marked as capturing (no event
//                queries, no memory given back), which must precede the capture
//                (allocator/caching_allocator.h, NoteCaptureBegin; docs/graphs.md rule 12);
//   began        after it succeeded: a new graph pool takes every allocation on the capture's
//                streams (a capture route, docs/pools.md); or `abandoned` if it failed, which
//                lifts the mark;
//   ended        after the driver's end: the route ends and the mark is lifted. The graph pool
//                keeps its memory (the graph replays into it) for the rest of the process: the
//                driver's graph objects, which tidepool does not see, may outlive any point
//                where it could be given back.
#ifndef TIDEPOOL_INTEGRATIONS_PRELOAD_PRELOAD_SUPPORT_H_
#define TIDEPOOL_INTEGRATIONS_PRELOAD_PRELOAD_SUPPORT_H_

#include <stddef.h>

#include "integrations/c_api/tidepool.h"

#ifdef __cplusplus
extern "C" {
#endif

tidepool_status tidepool_preload_capture_will_begin(int device);
tidepool_status tidepool_preload_capture_began(int device, void* stream);
tidepool_status tidepool_preload_capture_abandoned(int device);
tidepool_status tidepool_preload_capture_ended(int device, void* stream);
// A stream of tidepool's own on `device` that nothing else uses (made once, kept for the
// process): the home of the synchronous API's blocks (cuMemAlloc, cudaMalloc).
tidepool_status tidepool_preload_private_stream(int device, void** stream);
// Bytes tidepool holds on `device` in blocks that are free (reserved minus allocated, every
// pool), which the interposed cuMemGetInfo counts as free.
tidepool_status tidepool_preload_cached_bytes(int device, size_t* cached);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TIDEPOOL_INTEGRATIONS_PRELOAD_PRELOAD_SUPPORT_H_
