// tidepool's C API: the stream-ordered caching allocator, its pools and their routing, and CUDA
// graph capture into those pools, for any program that can call C (engines, CuPy, custom
// servers, other languages through their FFI).
//
// Pure C99, also valid C++; every symbol starts with `tidepool_` or `TIDEPOOL_`. The library
// behind it is //integrations/c_api:tidepool_c (static) or libtidepool.so (shared, exporting
// only these functions). docs/api.md has an example and says where the semantics of each call
// are written down.
//
// Conventions, for every function below:
//   * It returns a tidepool_status. On anything but TIDEPOOL_OK, tidepool_last_error() gives a
//     message saying what was wrong, for the calling thread only; nothing was changed (except
//     by the calls that consume their argument whatever they return, which say so), and
//     output arguments hold nothing usable (a failed tidepool_malloc stores NULL).
//   * Bad input never aborts the process: a NULL output argument, a pointer tidepool did not
//     allocate, a double free, an unknown device or pool, an end without a begin each return a
//     code and a message.
//   * Every function may be called from any thread.
//   * `device` is a device ordinal as CUDA numbers them; `stream` is a CUstream / cudaStream_t
//     of that device (NULL is the legacy default stream).
//
// The process has one tidepool runtime: for each device, a caching allocator and its pools. It
// is made on the first call that needs it, from every GPU the CUDA driver reports and the
// configuration in the environment variable TIDEPOOL_CONF (docs/configuration.md). If that
// fails (no driver, no GPU, a bad TIDEPOOL_CONF) the call returns the error and the next call
// tries again. Tests and programs without a GPU call tidepool_init_simulated before anything
// else to get simulated devices instead.
#ifndef TIDEPOOL_INTEGRATIONS_C_API_TIDEPOOL_H_
#define TIDEPOOL_INTEGRATIONS_C_API_TIDEPOOL_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// The version of this header. It goes up by one whenever a declaration here changes in a way
// that breaks programs built against the previous one. A program checks at start that
// tidepool_api_version() == TIDEPOOL_API_VERSION, i.e. that the library it runs with
// implements the header it was compiled with.
#define TIDEPOOL_API_VERSION 1

// What a call did. The codes follow the error classes of tidepool's C++ API (absl::Status).
typedef enum tidepool_status {
  TIDEPOOL_OK = 0,
  // Bad input: a NULL output argument, a size of 0, a negative device, a pointer tidepool did
  // not allocate, a filter kind that does not exist, a buffer too small.
  TIDEPOOL_INVALID_ARGUMENT = 1,
  // The device has no memory left for the request, even after tidepool returned its cache, or
  // the request is larger than the device could ever hold.
  TIDEPOOL_OUT_OF_MEMORY = 2,
  // A device or a pool that tidepool does not know.
  TIDEPOOL_NOT_FOUND = 3,
  // A call out of order: a double free, an end without a begin, a double release, an
  // allocation routed to a pool released meanwhile, tidepool_init_simulated after the runtime
  // exists.
  TIDEPOOL_FAILED_PRECONDITION = 4,
  // No usable CUDA driver or GPU.
  TIDEPOOL_UNAVAILABLE = 5,
  // A fault inside tidepool or the driver; the message says which.
  TIDEPOOL_INTERNAL = 6,
  // The ranks of a communicator did not all come within a symmetric pool's agreement timeout
  // (a rank missing or stalled); the communicator has been aborted.
  TIDEPOOL_DEADLINE_EXCEEDED = 7
} tidepool_status;

// A pool's identity: a pair of integers, one-to-one with PyTorch's MempoolId_t. {0, 0} is the
// default pool of each device, which always exists. Ids from tidepool_new_pool_id are {0, n},
// those from tidepool_new_graph_pool_id are {n, 0}; the two never collide.
typedef struct tidepool_pool_id {
  uint64_t first;
  uint64_t second;
} tidepool_pool_id;

// The filters of tidepool_begin_allocate_to_pool: which allocations its routing entry sends to
// the pool, and what its `filter_value` is.
typedef enum tidepool_route_filter {
  // Every allocation by the calling thread; filter_value must be 0.
  TIDEPOOL_ROUTE_CURRENT_THREAD = 0,
  // Every allocation on one stream; filter_value is the stream handle, (uint64_t)(uintptr_t)
  // stream. The stream is resolved to its unique id at the begin, so the entry does not follow
  // the handle if the stream is destroyed and the handle reused.
  TIDEPOOL_ROUTE_STREAM = 1,
  // Every allocation on a stream taking part in one CUDA graph capture; filter_value is the
  // capture's id (cudaStreamGetCaptureInfo's id), never 0.
  TIDEPOOL_ROUTE_CAPTURE = 2,
  // Every allocation on the device; filter_value must be 0.
  TIDEPOOL_ROUTE_EVERYONE = 3
} tidepool_route_filter;

// --- Version, errors, start -------------------------------------------------------------------

// TIDEPOOL_API_VERSION as the library was built.
int tidepool_api_version(void);

// The message of the calling thread's most recent failed call ("" if none failed yet). Calls
// that succeed leave it as it was. The text stays valid until the thread's next failed call or
// its exit; other threads' failures never touch it.
const char* tidepool_last_error(void);

// The name of a code ("TIDEPOOL_OUT_OF_MEMORY"), or "unknown tidepool_status" for a value that
// is not one. Never NULL.
const char* tidepool_status_name(tidepool_status status);

// For tests, and for programs without a GPU (replaying traces, dry runs): makes the process's
// runtime out of `device_count` simulated devices (1 to 64) of `bytes_per_device` each (1 byte
// to 1 TiB: the host keeps tables in proportion to a device's size), with
// TIDEPOOL_CONF's configuration. Simulated memory has no backing: the pointers it gives must
// never be dereferenced. Streams of a simulated device exist only inside tidepool, so only the
// NULL stream can be passed from C. Must come before every other call that needs the runtime:
// FAILED_PRECONDITION once the runtime exists (made by an earlier init or by such a call).
tidepool_status tidepool_init_simulated(int device_count, size_t bytes_per_device);

// How many devices the runtime has.
tidepool_status tidepool_device_count(int* count);

// --- Memory -----------------------------------------------------------------------------------
// The stream-ordering contract (allocator/caching_allocator.h): a block belongs to the stream
// it was allocated on and is reusable by later work on that stream as soon as it is freed; a
// block also used on other streams must be declared with tidepool_record_stream before it is
// freed, and is reusable only once those streams reach the free.

// Stores in *ptr a block of at least `size` bytes (512-byte aligned) usable on `stream` of
// `device`, from the pool that routing chooses for this thread and stream (the default pool if
// no routing entry matches). INVALID_ARGUMENT for a size of 0; OUT_OF_MEMORY when the device
// is full, with a message saying where its memory is, and for every size larger than the device
// could ever hold, however large (SIZE_MAX included), as cudaMalloc answers.
tidepool_status tidepool_malloc(void** ptr, size_t size, int device, void* stream);

// Returns a block to the pool it came from, whatever routing is active now, on any device.
// NULL does nothing (as free(NULL)). INVALID_ARGUMENT for a pointer outside the memory tidepool
// holds now; FAILED_PRECONDITION for a double free or a pointer into the middle of a block while
// tidepool still holds the block's memory. A double free after that memory went back to the
// device (tidepool_empty_cache, a pool's release or trim, out-of-memory recovery) cannot be told
// from a foreign pointer: it is INVALID_ARGUMENT, and the message says both are possible.
tidepool_status tidepool_free(void* ptr);

// Declares that the live block at `ptr` is used on `stream` (a stream of the block's device)
// as well as the one it was allocated on. Errors as for tidepool_free.
tidepool_status tidepool_record_stream(void* ptr, void* stream);

// Frees `ptr` as ordered on `stream` (cudaFreeAsync's contract): the block is reusable once
// `stream` has reached this point. When `stream` is the block's own stream this is
// tidepool_free; otherwise the stream is recorded first (tidepool_record_stream), so the block
// waits for it. Errors as for tidepool_free, and for a stream of another device.
tidepool_status tidepool_free_async(void* ptr, void* stream);

// Returns every whole free segment of `device`, in every pool that lets its free memory be
// taken back, to where it came from.
tidepool_status tidepool_empty_cache(int device);

// --- Pools ------------------------------------------------------------------------------------
// The semantics, each rule with its reason, are in docs/pools.md. In short: begin creates the
// pool if needed (or revives a released one), adds a reference and pushes a routing entry; end
// pops the entry and keeps the reference; release drops a reference, and at zero the pool's
// free memory goes back and the pool is gone once its last block is freed. Entering the same
// pool again while inside it nests. Routing entries are searched newest first.

// A new id for a pool the program makes: {0, n}.
tidepool_status tidepool_new_pool_id(tidepool_pool_id* pool);
// A new id for a CUDA graph's private pool: {n, 0}.
tidepool_status tidepool_new_graph_pool_id(tidepool_pool_id* pool);

// Begin with the calling-thread filter: every allocation this thread makes on `device` goes to
// `pool` until the matching end. sglang's and PyTorch's use_mem_pool pattern.
tidepool_status tidepool_begin_allocate_current_thread_to_pool(int device, tidepool_pool_id pool);

// Begin with any filter: `filter_kind` is a tidepool_route_filter, `filter_value` as that enum
// says. INVALID_ARGUMENT for a kind that does not exist or a value it does not accept.
tidepool_status tidepool_begin_allocate_to_pool(int device, tidepool_pool_id pool, int filter_kind,
                                                uint64_t filter_value);

// Ends the newest routing entry to `pool` that the calling thread began with the current-thread
// filter, else the newest entry to it of another filter. FAILED_PRECONDITION when there is none
// (an end without a begin).
tidepool_status tidepool_end_allocate_to_pool(int device, tidepool_pool_id pool);

// Drops one reference to `pool`. NOT_FOUND for a pool the device never had; FAILED_PRECONDITION
// for a pool with no references left (a double release, or references that thread exit dropped:
// the message says which), or for a release that would leave the pool fewer references than
// routing entries still sending allocations to it (every begin takes one reference and makes
// one entry: end the entries first; docs/pools.md rule 9); INVALID_ARGUMENT for the default
// pool.
tidepool_status tidepool_release_pool(int device, tidepool_pool_id pool);

// Creates `pool` on `device` with its segments from user callbacks, and takes one reference to
// it, which tidepool_release_pool drops (as torch.cuda.MemPool(allocator=...) does). Route to it
// with the begin / end calls above. tidepool calls the callbacks only for whole segments, never
// two at once, and keeps them for as long as the runtime lives (a released pool may be begun
// again):
//   * alloc_segment(size, device, context) returns `size` bytes for the device, 512-byte
//     aligned, or NULL when it has none;
//   * free_segment(ptr, size, device, context) takes back a segment, with its size, once no
//     queued work uses it.
// `context` is passed to both and never read. tidepool runs the callbacks under its device lock,
// so they must not call tidepool: a call from inside one (other than tidepool_last_error,
// tidepool_status_name and tidepool_api_version) returns FAILED_PRECONDITION and changes
// nothing, and a callback that waits for another thread calling tidepool deadlocks. The id must
// be new on the device:
// FAILED_PRECONDITION if the device has had a pool with this id; INVALID_ARGUMENT for the
// default pool or a NULL callback.
tidepool_status tidepool_create_callback_pool(
    int device, tidepool_pool_id pool,
    void* (*alloc_segment)(size_t size, int device, void* context),
    void (*free_segment)(void* ptr, size_t size, int device, void* context), void* context);

// Returns the pool's whole free segments to where they came from (even for a pool that keeps
// its memory through tidepool_empty_cache). NOT_FOUND for a pool the device never had.
tidepool_status tidepool_trim_pool(int device, tidepool_pool_id pool);

// The device and pool of the live block at `ptr`. INVALID_ARGUMENT for a pointer tidepool did
// not allocate; FAILED_PRECONDITION for one that is not a live block.
tidepool_status tidepool_pool_of(const void* ptr, int* device, tidepool_pool_id* pool);

// --- CUDA graph capture -----------------------------------------------------------------------
// graph/capture.h has the semantics. A capture begun here routes every allocation on a stream
// taking part in it (its own stream, and every stream that joins it by waiting on one of its
// events) to the capture's pool: a new private graph pool, or one shared with other graphs. The
// graph that tidepool_capture_end makes holds a reference to that pool for as long as it lives,
// so the memory it replays into is never given back meanwhile (tidepool_empty_cache and
// out-of-memory recovery leave graph pools alone, tidepool_trim_pool refuses one that is held).
// When the last holder (graph, capture or tidepool_graph_pool_create's reference) is gone, the
// pool is released: its free memory goes back at once, blocks still live (a graph's outputs)
// go back as they are freed.
//
// Ownership: tidepool_capture_begin gives the caller a tidepool_capture, which exactly one of
// tidepool_capture_end and tidepool_capture_abandon consumes, whatever it returns; after that
// call the pointer is dangling. tidepool_capture_end gives a tidepool_graph, which
// tidepool_graph_destroy consumes. Neither object may be used by two threads at once; different
// ones may be used from different threads. A capture not ended leaves the device marked as
// capturing (no memory goes back to it, cross-stream frees wait) until it is.

// An ongoing capture of one stream, and an instantiated graph with its pool reference.
typedef struct tidepool_capture tidepool_capture;
typedef struct tidepool_graph tidepool_graph;

// Which other CUDA calls a capture forbids while it runs; the values are CUstreamCaptureMode's
// (cudaStreamCaptureMode's). GLOBAL is CUDA's and PyTorch's default.
typedef enum tidepool_capture_mode {
  TIDEPOOL_CAPTURE_MODE_GLOBAL = 0,
  TIDEPOOL_CAPTURE_MODE_THREAD_LOCAL = 1,
  TIDEPOOL_CAPTURE_MODE_RELAXED = 2
} tidepool_capture_mode;

// Begins capturing `stream` of `device` (not the legacy default stream NULL, which CUDA refuses
// to capture) in `mode` (a tidepool_capture_mode), and stores the capture in *capture.
// `share_pool` NULL: the capture gets a new private graph pool. Otherwise it shares that graph
// pool (an id {n,0} from tidepool_graph_pool_create or tidepool_graph_pool, or that of another
// capture) with the graphs already made into it: PyTorch's pool=graph_pool_handle(). Graphs that
// share a pool must never replay at the same time, since they reuse each other's free memory.
// On error *capture is NULL and nothing is left behind: INVALID_ARGUMENT for a mode that is not
// one, a shared id that is the default pool or not a graph pool id; NOT_FOUND for a shared pool
// the device never had; FAILED_PRECONDITION for one that nothing holds any more; the driver's
// error when the stream cannot be captured (an unknown stream, one capturing already).
tidepool_status tidepool_capture_begin(int device, void* stream,
                                       const tidepool_pool_id* share_pool, int mode,
                                       tidepool_capture** capture);

// Ends the capture, instantiates its graph and stores it in *graph. Always consumes `capture`,
// whatever it returns. On error *graph is NULL and the capture was cleaned up as an abandoned
// one: its routing, its capture mark and its pool reference are gone, and whatever the driver
// made was destroyed. The error is the driver's when it invalidated the capture (an illegal call
// during capture) or could not instantiate the graph. `graph` NULL: INVALID_ARGUMENT, and the
// capture is abandoned all the same; `capture` NULL: INVALID_ARGUMENT, nothing happens.
tidepool_status tidepool_capture_end(tidepool_capture* capture, tidepool_graph** graph);

// Ends the capture and throws its graph away, dropping the capture's pool reference. Always
// consumes `capture`, whatever it returns (an error says only that dropping the reference
// failed; everything else was cleaned up). A capture that the driver invalidated is no error
// here. `capture` NULL: INVALID_ARGUMENT.
tidepool_status tidepool_capture_abandon(tidepool_capture* capture);

// The pool the capture's allocations go to.
tidepool_status tidepool_capture_pool(const tidepool_capture* capture, tidepool_pool_id* pool);

// Queues one replay of the graph on `stream` (a stream of the graph's device).
tidepool_status tidepool_graph_launch(tidepool_graph* graph, void* stream);

// The pool the graph replays into: pass it as share_pool to capture another graph into it.
tidepool_status tidepool_graph_pool(const tidepool_graph* graph, tidepool_pool_id* pool);

// Destroys the executable graph and drops its pool reference; a graph destroyed while a replay
// runs is freed by the driver when the replay completes. Always consumes `graph`, whatever it
// returns (an error says which of the two steps failed; both were tried). NULL does nothing.
tidepool_status tidepool_graph_destroy(tidepool_graph* graph);

// Creates a graph pool on `device` that exists before, between and after the graphs that share
// it (PyTorch's graph_pool_handle()), stores its new id {n,0} in *pool, and takes one reference
// to it, which tidepool_release_pool drops. Pass it as share_pool to tidepool_capture_begin.
tidepool_status tidepool_graph_pool_create(int device, tidepool_pool_id* pool);

// --- Symmetric NCCL pools ---------------------------------------------------------------------
// docs/nccl.md has the rules and a worked example. A symmetric pool belongs to one NCCL
// communicator (NCCL 2.27 or newer, opened at run time: TIDEPOOL_NCCL_LIBRARY, else
// libnccl.so.2) and places its buffers at the same offset of the same window on every rank, as
// collectives on symmetric windows need, provided every rank makes the same sequence of calls
// on it with the same sizes (the same-program rule). Its segments come from ncclMemAlloc and are
// registered with ncclCommWindowRegister(..., NCCL_WIN_COLL_SYMMETRIC) once each, after every
// rank agreed. It is a pool of its device like any other: route to it with
// tidepool_begin_allocate_current_thread_to_pool (or the symmetric begin / end below), free its
// buffers with tidepool_free, ask tidepool_pool_of, tidepool_stats_json and
// tidepool_snapshot_json about it (the snapshot gives each segment's window); the device-wide
// stats (pool NULL) do not include it. Its buffers are reusable at once when freed, in stream
// order: use them on one stream, or synchronize the others before freeing
// (tidepool_record_stream on one is FAILED_PRECONDITION).
//
// COLLECTIVE calls, made by every rank in the same order: create, reserve, trim, destroy, and
// any allocation that grows the pool. When the ranks do not agree (a different size, a rank
// missing or stalled past the timeout) every rank's call fails within the timeout with nothing
// registered (FAILED_PRECONDITION when they diverged, DEADLINE_EXCEEDED when one did not come); the pool is then broken, every later call on it fails at once, and after a timeout the
// communicator has been aborted (ncclCommAbort, which frees it: do not destroy it again).

// Makes the symmetric pool of `communicator` (an ncclComm_t of `device`'s rank) and stores its
// new id in *pool. `growth_bytes`: an allocation that finds no room grows the pool by at least
// this much, collectively (0: it grows only by reserve). `agreement_timeout_seconds`: how long
// the ranks wait for each other at a growth, reserve or trim (> 0). One pool per communicator:
// FAILED_PRECONDITION for a second; INVALID_ARGUMENT for a NULL communicator or a timeout that
// is not positive; UNAVAILABLE when NCCL cannot be opened, FAILED_PRECONDITION when it is older
// than 2.27 (both naming the library). Not collective itself.
tidepool_status tidepool_symmetric_pool_create(int device, void* communicator, size_t growth_bytes,
                                               double agreement_timeout_seconds,
                                               tidepool_pool_id* pool);
// Collective: adds one registered segment of `bytes` to the pool. FAILED_PRECONDITION during a
// CUDA graph capture on the device (reserve before capturing); OUT_OF_MEMORY when a rank's
// device is full (every rank fails alike and the pool is as it was).
tidepool_status tidepool_symmetric_pool_reserve(int device, tidepool_pool_id pool, size_t bytes);
// Collective: gives back every segment with no live buffer (deregistered, then freed).
// tidepool_trim_pool does the same for a symmetric pool.
tidepool_status tidepool_symmetric_pool_trim(int device, tidepool_pool_id pool);
// Collective: gives back every segment and ends the pool; its id is refused from then on.
// FAILED_PRECONDITION, changing nothing, while a buffer is live or a begin still holds it. A
// broken pool's segments cannot be deregistered (that is collective): they are kept until the
// process ends, and the pool is ended all the same.
tidepool_status tidepool_symmetric_pool_destroy(int device, tidepool_pool_id pool);
// The window (an ncclWindow_t) of the segment holding `ptr`, a pointer into a live buffer of a
// symmetric pool, and the offset of `ptr` from the window's start: the same on every rank.
// INVALID_ARGUMENT when no symmetric pool holds `ptr`.
tidepool_status tidepool_symmetric_lookup(const void* ptr, void** window, size_t* offset);
// sglang's pattern: every allocation this thread makes on `device` goes to the symmetric pool
// until tidepool_symmetric_end. Inside a CUDA graph capture this pauses the capture's routing
// for this thread only; the end restores it, with references balanced (docs/graphs.md rule 11).
// NOT_FOUND for an id that is not a symmetric pool of the device (never made, or destroyed).
tidepool_status tidepool_symmetric_begin(int device, tidepool_pool_id pool);
// Ends this thread's newest symmetric begin of `pool` and drops the reference it took.
// FAILED_PRECONDITION without a matching begin on this thread.
tidepool_status tidepool_symmetric_end(int device, tidepool_pool_id pool);

// --- Observability ----------------------------------------------------------------------------
// Both calls write a NUL-terminated JSON text into `buffer` (of `capacity` bytes) and store in
// *needed (when `needed` is not NULL) the bytes that text takes, NUL included. With buffer NULL
// and capacity 0 they only store *needed. A buffer too small gets nothing and the call returns
// INVALID_ARGUMENT with *needed set; the text can grow between two calls, so loop. `pool`
// NULL means the whole device, else that pool (NOT_FOUND for a pool the device never had).

// Statistics: current, peak and totals of requested, allocated and reserved bytes, blocks,
// segments, device allocations and frees, retries, out-of-memory errors (docs/stats.md).
tidepool_status tidepool_stats_json(int device, const tidepool_pool_id* pool, char* buffer,
                                    size_t capacity, size_t* needed);

// Every segment (its pool, address, size, stream and lane) with its blocks (address, size, size
// requested, state).
tidepool_status tidepool_snapshot_json(int device, const tidepool_pool_id* pool, char* buffer,
                                       size_t capacity, size_t* needed);

#ifdef __cplusplus
}  // extern "C"
#endif

#endif  // TIDEPOOL_INTEGRATIONS_C_API_TIDEPOOL_H_
