// libtidepool_preload.so: tidepool under programs that were not written for it, by LD_PRELOAD.
//
// WHERE IT INTERPOSES. At the driver. nvcc links the CUDA runtime statically by default, so a
// cudaMalloc symbol of our own would miss most programs; but every runtime since CUDA 11.3 finds
// the driver's entry points by asking cuGetProcAddress, which it gets with dlsym from libcuda. So
// this library wraps dlsym (answering "cuGetProcAddress" and "cuGetProcAddress_v2" with its own)
// and answers cuGetProcAddress for the functions it serves, including the runtime's self-lookup
// of "cuGetProcAddress" itself, without which it catches nothing (docs/integrations.md has the
// facts seen on the GPU host). It also exports the served driver functions under their own names
// (programs linked with -lcuda) and cudaMalloc, cudaFree, cudaMallocAsync and cudaFreeAsync
// (programs linked with a shared cudart).
//
// WHAT IT SERVES, from the process's one runtime in libtidepool.so.1 (this library is a thin
// layer over its C API):
//   * cuMemAllocAsync / cuMemFreeAsync (and their per-thread-default-stream forms): stream
//     ordered, as CUDA defines them; a free on another stream than the allocation's is recorded
//     on it first (tidepool_free_async);
//   * cuMemAlloc / cuMemFree / cuMemAllocPitch: the synchronous contract, where the memory is
//     usable on any stream once allocated, and the real cuMemFree waits for the device. Here the
//     blocks come from a stream of the interposer's own that nothing runs on, and a free records
//     every stream tidepool knows of on the device (the legacy default stream, and every stream
//     the program created through the driver) before the block goes back: it is reused only
//     once all the work queued before the free has finished, without the host waiting;
//   * cuMemGetInfo: the driver's answer, with the bytes tidepool caches but does not use counted
//     as free, so programs that size themselves from it do not shrink;
//   * cuStreamBeginCapture / cuStreamEndCapture: passed to the driver, with the capture marked
//     for the allocator before it begins and its allocations routed to a graph pool of its own
//     (integrations/preload/preload_support.h: docs/graphs.md rule 12 says why an unmarked
//     capture breaks);
//   * cuStreamCreate / cuStreamCreateWithPriority / cuStreamDestroy: passed to the driver, and
//     the streams remembered for the synchronous frees above.
// A pointer tidepool does not own (allocated before the interposer loaded, or in a context that
// is not its device's primary context, which tidepool does not allocate in) goes to the real
// driver's function.
//
// FORK AND EXIT. Nothing is done in static constructors: the first call initializes. In a child
// after fork every call goes to the real driver, which refuses CUDA that the parent initialized
// with its own error; tidepool's state, the parent's, is never touched there. At exit nothing is
// freed (the runtime stays to the process's end: CUDA may be torn down first). TIDEPOOL_STATS=1
// prints one line per device at exit; TIDEPOOL_TRACE=path (read by libtidepool.so.1) records a
// trace that `tidepool replay` reads.
//
// Thread safety: every entry point may be called from any thread.
#include <cuda.h>
// cuda.h maps cuGetProcAddress to cuGetProcAddress_v2; this file defines both, by their own names.
#undef cuGetProcAddress
#include <dlfcn.h>
#include <pthread.h>
#include <unistd.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <unordered_map>
#include <vector>

#include "integrations/c_api/tidepool.h"
#include "integrations/preload/preload_support.h"

namespace {

// --- The real functions ------------------------------------------------------------------------

using DlsymFn = void* (*)(void*, const char*);

// glibc's dlsym, not ours: dlvsym is not interposed. glibc 2.34 moved dlsym into libc with a new
// version; older ones have only the first.
DlsymFn RealDlsym() {
  static const DlsymFn real = [] {
    void* found = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (found == nullptr) found = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    return reinterpret_cast<DlsymFn>(found);
  }();
  return real;
}

// The driver's own entry points, resolved once from libcuda by their versioned names.
struct Driver {
  decltype(&::cuGetProcAddress_v2) get_proc_address_v2 = nullptr;
  CUresult (*get_proc_address_v1)(const char*, void**, int, cuuint64_t) = nullptr;  // pre-12.0
  decltype(&::cuMemAlloc_v2) mem_alloc = nullptr;
  decltype(&::cuMemFree_v2) mem_free = nullptr;
  decltype(&::cuMemAllocPitch_v2) mem_alloc_pitch = nullptr;
  decltype(&::cuMemGetInfo_v2) mem_get_info = nullptr;
  decltype(&::cuMemAllocAsync) mem_alloc_async = nullptr;
  decltype(&::cuMemAllocAsync) mem_alloc_async_ptsz = nullptr;
  decltype(&::cuMemFreeAsync) mem_free_async = nullptr;
  decltype(&::cuMemFreeAsync) mem_free_async_ptsz = nullptr;
  decltype(&::cuStreamBeginCapture_v2) begin_capture = nullptr;
  decltype(&::cuStreamBeginCapture_v2) begin_capture_ptsz = nullptr;
  decltype(&::cuStreamEndCapture) end_capture = nullptr;
  decltype(&::cuStreamEndCapture) end_capture_ptsz = nullptr;
  decltype(&::cuStreamCreate) stream_create = nullptr;
  decltype(&::cuStreamCreateWithPriority) stream_create_with_priority = nullptr;
  decltype(&::cuStreamDestroy_v2) stream_destroy = nullptr;
  decltype(&::cuCtxGetCurrent) ctx_get_current = nullptr;
  decltype(&::cuCtxGetDevice) ctx_get_device = nullptr;
  decltype(&::cuStreamGetCtx) stream_get_ctx = nullptr;
  decltype(&::cuStreamGetDevice) stream_get_device = nullptr;
  decltype(&::cuDevicePrimaryCtxRetain) primary_ctx_retain = nullptr;
};

template <typename Fn>
void Resolve(void* handle, const char* name, Fn* slot) {
  *slot = reinterpret_cast<Fn>(RealDlsym()(handle, name));
}

const Driver& TheDriver() {
  static const Driver* const driver = [] {
    auto* d = new Driver();
    const char* path = std::getenv("TIDEPOOL_LIBCUDA");
    void* handle = dlopen(path != nullptr && *path != '\0' ? path : "libcuda.so.1",
                          RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) return d;  // every call then fails as the driver would: not loaded
    Resolve(handle, "cuGetProcAddress_v2", &d->get_proc_address_v2);
    Resolve(handle, "cuGetProcAddress", &d->get_proc_address_v1);
    Resolve(handle, "cuMemAlloc_v2", &d->mem_alloc);
    Resolve(handle, "cuMemFree_v2", &d->mem_free);
    Resolve(handle, "cuMemAllocPitch_v2", &d->mem_alloc_pitch);
    Resolve(handle, "cuMemGetInfo_v2", &d->mem_get_info);
    Resolve(handle, "cuMemAllocAsync", &d->mem_alloc_async);
    Resolve(handle, "cuMemAllocAsync_ptsz", &d->mem_alloc_async_ptsz);
    Resolve(handle, "cuMemFreeAsync", &d->mem_free_async);
    Resolve(handle, "cuMemFreeAsync_ptsz", &d->mem_free_async_ptsz);
    Resolve(handle, "cuStreamBeginCapture_v2", &d->begin_capture);
    Resolve(handle, "cuStreamBeginCapture_v2_ptsz", &d->begin_capture_ptsz);
    Resolve(handle, "cuStreamEndCapture", &d->end_capture);
    Resolve(handle, "cuStreamEndCapture_ptsz", &d->end_capture_ptsz);
    Resolve(handle, "cuStreamCreate", &d->stream_create);
    Resolve(handle, "cuStreamCreateWithPriority", &d->stream_create_with_priority);
    Resolve(handle, "cuStreamDestroy_v2", &d->stream_destroy);
    Resolve(handle, "cuCtxGetCurrent", &d->ctx_get_current);
    Resolve(handle, "cuCtxGetDevice", &d->ctx_get_device);
    Resolve(handle, "cuStreamGetCtx", &d->stream_get_ctx);
    Resolve(handle, "cuStreamGetDevice", &d->stream_get_device);
    Resolve(handle, "cuDevicePrimaryCtxRetain", &d->primary_ctx_retain);
    return d;
  }();
  return *driver;
}

// --- Process state -----------------------------------------------------------------------------

// Set in a child after fork: everything goes to the real driver there.
std::atomic<bool> forked{false};
// Counts for TIDEPOOL_STATS, kept only when it asks for them: a shared counter bumped on every
// allocation is a locked instruction on the pair's hot path (and a contended line across threads).
std::atomic<bool> counting{false};
std::atomic<int64_t> served_allocations{0};
std::atomic<int64_t> passed_frees{0};
inline void Count(std::atomic<int64_t>& counter) {
  if (counting.load(std::memory_order_relaxed)) counter.fetch_add(1, std::memory_order_relaxed);
}
// Bumped whenever a stream is destroyed: per-thread caches of a stream's device compare it.
std::atomic<uint64_t> stream_generation{1};

bool Forked() { return forked.load(std::memory_order_relaxed); }

// What each thread remembers between calls, in one place: the device of the context and of the
// stream it last asked about, and its private stream. Initial-exec TLS: this library is loaded
// with the program (LD_PRELOAD), so its thread-locals are reached without a call.
struct ThreadCache {
  CUcontext ctx = nullptr;
  int ctx_device = -1;
  CUstream stream = nullptr;
  uint64_t stream_generation = 0;
  int stream_device = -1;
  int private_device = -1;
  CUstream private_stream = nullptr;
};
__attribute__((tls_model("initial-exec"))) thread_local ThreadCache cache;

// The streams the program made through the driver, by device, for the synchronous frees; and
// each device's primary context.
std::mutex streams_mu;
std::unordered_map<CUstream, int>& KnownStreams() {
  static auto* streams = new std::unordered_map<CUstream, int>();
  return *streams;
}
struct DeviceState {
  CUcontext primary = nullptr;
};
std::unordered_map<int, DeviceState>& Devices() {
  static auto* devices = new std::unordered_map<int, DeviceState>();
  return *devices;
}

void PrintStats() {
  int devices = 0;
  if (tidepool_device_count(&devices) != TIDEPOOL_OK) return;
  for (int device = 0; device < devices; ++device) {
    char json[4096];
    if (tidepool_stats_json(device, nullptr, json, sizeof(json), nullptr) != TIDEPOOL_OK) continue;
    std::fprintf(stderr,
                 "tidepool: device %d: %lld allocations served by tidepool, %lld frees passed to "
                 "the driver; stats %s\n",
                 device, static_cast<long long>(served_allocations.load()),
                 static_cast<long long>(passed_frees.load()), json);
  }
}

void OnFork() { forked.store(true, std::memory_order_relaxed); }

// The first call's work: fork and exit handlers.
void Initialize() {
  static const bool done = [] {
    pthread_atfork(nullptr, nullptr, &OnFork);
    const char* stats = std::getenv("TIDEPOOL_STATS");
    if (stats != nullptr && std::strcmp(stats, "1") == 0) {
      counting.store(true, std::memory_order_relaxed);
      std::atexit(&PrintStats);
    }
    return true;
  }();
  (void)done;
}

// The device whose primary context is `ctx`, or -1 (a context tidepool does not allocate in).
int PrimaryDeviceOf(CUcontext ctx, CUdevice device) {
  const Driver& d = TheDriver();
  std::lock_guard<std::mutex> lock(streams_mu);
  DeviceState& state = Devices()[device];
  if (state.primary == nullptr && d.primary_ctx_retain != nullptr) {
    // Kept retained for the process's life, as tidepool's own device keeps it.
    if (d.primary_ctx_retain(&state.primary, device) != CUDA_SUCCESS) state.primary = nullptr;
  }
  return state.primary == ctx ? static_cast<int>(device) : -1;
}

// The device of the current context if it is a primary context, else -1.
int CurrentDevice() {
  const Driver& d = TheDriver();
  CUcontext ctx = nullptr;
  if (d.ctx_get_current == nullptr || d.ctx_get_current(&ctx) != CUDA_SUCCESS || ctx == nullptr) {
    return -1;
  }
  if (ctx == cache.ctx) return cache.ctx_device;
  CUdevice device = 0;
  if (d.ctx_get_device(&device) != CUDA_SUCCESS) return -1;
  cache.ctx = ctx;
  cache.ctx_device = PrimaryDeviceOf(ctx, device);
  return cache.ctx_device;
}

bool IsSpecialStream(CUstream stream) {
  return stream == nullptr || stream == CU_STREAM_LEGACY || stream == CU_STREAM_PER_THREAD;
}

// The device of `stream` if its context is a primary context, else -1.
int StreamDevice(CUstream stream) {
  if (IsSpecialStream(stream)) return CurrentDevice();
  const Driver& d = TheDriver();
  const uint64_t generation = stream_generation.load(std::memory_order_acquire);
  if (stream == cache.stream && generation == cache.stream_generation) {
    return cache.stream_device;
  }
  CUcontext ctx = nullptr;
  CUdevice device = 0;
  if (d.stream_get_ctx == nullptr || d.stream_get_ctx(stream, &ctx) != CUDA_SUCCESS ||
      d.stream_get_device == nullptr || d.stream_get_device(stream, &device) != CUDA_SUCCESS) {
    return -1;
  }
  cache.stream = stream;
  cache.stream_generation = generation;
  cache.stream_device = PrimaryDeviceOf(ctx, device);
  return cache.stream_device;
}

// The interposer's own stream on `device`, made by tidepool, which nothing else uses: the home
// of the synchronous API's blocks.
CUstream PrivateStream(int device) {
  if (device != cache.private_device) {
    void* stream = nullptr;
    if (tidepool_preload_private_stream(device, &stream) != TIDEPOOL_OK) return nullptr;
    cache.private_device = device;
    cache.private_stream = static_cast<CUstream>(stream);
  }
  return cache.private_stream;
}

CUresult ToCuResult(tidepool_status status) {
  switch (status) {
    case TIDEPOOL_OK:
      return CUDA_SUCCESS;
    case TIDEPOOL_OUT_OF_MEMORY:
      return CUDA_ERROR_OUT_OF_MEMORY;
    case TIDEPOOL_UNAVAILABLE:
      return CUDA_ERROR_NOT_INITIALIZED;
    default:
      return CUDA_ERROR_INVALID_VALUE;
  }
}

// --- Serving ----------------------------------------------------------------------------------

CUresult AllocateOn(CUdeviceptr* dptr, size_t bytes, int device, CUstream stream) {
  if (dptr == nullptr) return CUDA_ERROR_INVALID_VALUE;
  void* block = nullptr;
  const tidepool_status status = tidepool_malloc(&block, bytes, device, stream);
  if (status != TIDEPOOL_OK) return ToCuResult(status);
  Count(served_allocations);
  *dptr = reinterpret_cast<CUdeviceptr>(block);
  return CUDA_SUCCESS;
}

CUresult SynchronousAllocate(CUdeviceptr* dptr, size_t bytes) {
  Initialize();
  const int device = Forked() ? -1 : CurrentDevice();
  if (device < 0) {
    const Driver& d = TheDriver();
    return d.mem_alloc != nullptr ? d.mem_alloc(dptr, bytes) : CUDA_ERROR_NOT_INITIALIZED;
  }
  if (bytes == 0) return CUDA_ERROR_INVALID_VALUE;  // as the driver answers cuMemAlloc(0)
  return AllocateOn(dptr, bytes, device, PrivateStream(device));
}

// A synchronous free: every stream known on the block's device is recorded, so the block is
// reused only after all work queued before this free (see the file comment).
CUresult SynchronousFree(CUdeviceptr dptr) {
  Initialize();
  void* ptr = reinterpret_cast<void*>(dptr);
  int device = -1;
  tidepool_pool_id pool;
  if (ptr != nullptr && !Forked() && tidepool_pool_of(ptr, &device, &pool) == TIDEPOOL_OK) {
    std::vector<CUstream> streams = {CU_STREAM_LEGACY};
    {
      std::lock_guard<std::mutex> lock(streams_mu);
      for (const auto& [stream, stream_device] : KnownStreams()) {
        if (stream_device == device) streams.push_back(stream);
      }
    }
    for (CUstream stream : streams) tidepool_record_stream(ptr, stream);
    return ToCuResult(tidepool_free(ptr));
  }
  if (ptr != nullptr) Count(passed_frees);
  const Driver& d = TheDriver();
  return d.mem_free != nullptr ? d.mem_free(dptr) : CUDA_ERROR_NOT_INITIALIZED;
}

CUresult AsyncAllocate(CUdeviceptr* dptr, size_t bytes, CUstream stream, bool per_thread) {
  Initialize();
  const int device = Forked() ? -1 : StreamDevice(stream);
  if (device < 0) {
    const Driver& d = TheDriver();
    auto real = per_thread ? d.mem_alloc_async_ptsz : d.mem_alloc_async;
    return real != nullptr ? real(dptr, bytes, stream) : CUDA_ERROR_NOT_INITIALIZED;
  }
  if (per_thread && stream == nullptr) stream = CU_STREAM_PER_THREAD;
  return AllocateOn(dptr, bytes, device, stream);
}

CUresult AsyncFree(CUdeviceptr dptr, CUstream stream, bool per_thread) {
  Initialize();
  void* ptr = reinterpret_cast<void*>(dptr);
  if (per_thread && stream == nullptr) stream = CU_STREAM_PER_THREAD;
  if (!Forked() && ptr != nullptr) {
    const tidepool_status status = tidepool_free_async(ptr, stream);
    if (status != TIDEPOOL_INVALID_ARGUMENT) return ToCuResult(status);
  }
  if (ptr != nullptr) Count(passed_frees);
  const Driver& d = TheDriver();
  auto real = per_thread ? d.mem_free_async_ptsz : d.mem_free_async;
  return real != nullptr ? real(dptr, stream) : CUDA_ERROR_NOT_INITIALIZED;
}

CUresult BeginCapture(CUstream stream, CUstreamCaptureMode mode, bool per_thread) {
  Initialize();
  const Driver& d = TheDriver();
  auto real = per_thread ? d.begin_capture_ptsz : d.begin_capture;
  if (real == nullptr) return CUDA_ERROR_NOT_INITIALIZED;
  const int device = Forked() ? -1 : StreamDevice(stream);
  if (device < 0) return real(stream, mode);
  tidepool_preload_capture_will_begin(device);
  const CUresult result = real(stream, mode);
  if (result != CUDA_SUCCESS ||
      tidepool_preload_capture_began(device, stream) != TIDEPOOL_OK) {
    tidepool_preload_capture_abandoned(device);
  }
  return result;
}

CUresult EndCapture(CUstream stream, CUgraph* graph, bool per_thread) {
  Initialize();
  const Driver& d = TheDriver();
  auto real = per_thread ? d.end_capture_ptsz : d.end_capture;
  if (real == nullptr) return CUDA_ERROR_NOT_INITIALIZED;
  const int device = Forked() ? -1 : StreamDevice(stream);
  const CUresult result = real(stream, graph);
  // Whatever the driver said, the capture is over; a capture tidepool did not see is no error.
  if (device >= 0) tidepool_preload_capture_ended(device, stream);
  return result;
}

void RememberStream(CUstream stream) {
  const int device = StreamDevice(stream);
  if (device < 0) return;
  std::lock_guard<std::mutex> lock(streams_mu);
  KnownStreams()[stream] = device;
}

// --- The per-thread-default-stream forms cuGetProcAddress hands out -----------------------------

CUresult MemAllocAsyncPtsz(CUdeviceptr* dptr, size_t bytes, CUstream stream) {
  return AsyncAllocate(dptr, bytes, stream, /*per_thread=*/true);
}
CUresult MemFreeAsyncPtsz(CUdeviceptr dptr, CUstream stream) {
  return AsyncFree(dptr, stream, /*per_thread=*/true);
}
CUresult BeginCapturePtsz(CUstream stream, CUstreamCaptureMode mode) {
  return BeginCapture(stream, mode, /*per_thread=*/true);
}
CUresult EndCapturePtsz(CUstream stream, CUgraph* graph) {
  return EndCapture(stream, graph, /*per_thread=*/true);
}

}  // namespace

// --- Exported: the driver's names ---------------------------------------------------------------

extern "C" {

CUresult cuMemAlloc_v2(CUdeviceptr* dptr, size_t bytesize) {
  return SynchronousAllocate(dptr, bytesize);
}

CUresult cuMemFree_v2(CUdeviceptr dptr) { return SynchronousFree(dptr); }

CUresult cuMemAllocPitch_v2(CUdeviceptr* dptr, size_t* pitch, size_t width, size_t height,
                            unsigned int element_size) {
  Initialize();
  if (Forked() || CurrentDevice() < 0) {  // not tidepool's context: the driver picks the pitch
    const Driver& d = TheDriver();
    return d.mem_alloc_pitch != nullptr
               ? d.mem_alloc_pitch(dptr, pitch, width, height, element_size)
               : CUDA_ERROR_NOT_INITIALIZED;
  }
  if (pitch == nullptr || (element_size != 4 && element_size != 8 && element_size != 16)) {
    return CUDA_ERROR_INVALID_VALUE;
  }
  // tidepool's blocks are 512-byte aligned: rows of a multiple of 512 bytes keep every row so.
  const size_t row = (width + 511) / 512 * 512;
  if (height != 0 && row > SIZE_MAX / height) return CUDA_ERROR_INVALID_VALUE;
  const CUresult result = SynchronousAllocate(dptr, row * height);
  if (result == CUDA_SUCCESS) *pitch = row;
  return result;
}

CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total_bytes) {
  Initialize();
  const Driver& d = TheDriver();
  if (d.mem_get_info == nullptr) return CUDA_ERROR_NOT_INITIALIZED;
  const CUresult result = d.mem_get_info(free_bytes, total_bytes);
  if (result != CUDA_SUCCESS || free_bytes == nullptr || Forked()) return result;
  const int device = CurrentDevice();
  size_t cached = 0;
  if (device >= 0 && tidepool_preload_cached_bytes(device, &cached) == TIDEPOOL_OK) {
    *free_bytes += cached;
    if (total_bytes != nullptr && *free_bytes > *total_bytes) *free_bytes = *total_bytes;
  }
  return result;
}

CUresult cuMemAllocAsync(CUdeviceptr* dptr, size_t bytesize, CUstream stream) {
  return AsyncAllocate(dptr, bytesize, stream, /*per_thread=*/false);
}

CUresult cuMemFreeAsync(CUdeviceptr dptr, CUstream stream) {
  return AsyncFree(dptr, stream, /*per_thread=*/false);
}

CUresult cuStreamBeginCapture_v2(CUstream stream, CUstreamCaptureMode mode) {
  return BeginCapture(stream, mode, /*per_thread=*/false);
}

CUresult cuStreamEndCapture(CUstream stream, CUgraph* graph) {
  return EndCapture(stream, graph, /*per_thread=*/false);
}

CUresult cuStreamCreate(CUstream* stream, unsigned int flags) {
  Initialize();
  const Driver& d = TheDriver();
  if (d.stream_create == nullptr) return CUDA_ERROR_NOT_INITIALIZED;
  const CUresult result = d.stream_create(stream, flags);
  if (result == CUDA_SUCCESS && !Forked()) RememberStream(*stream);
  return result;
}

CUresult cuStreamCreateWithPriority(CUstream* stream, unsigned int flags, int priority) {
  Initialize();
  const Driver& d = TheDriver();
  if (d.stream_create_with_priority == nullptr) return CUDA_ERROR_NOT_INITIALIZED;
  const CUresult result = d.stream_create_with_priority(stream, flags, priority);
  if (result == CUDA_SUCCESS && !Forked()) RememberStream(*stream);
  return result;
}

CUresult cuStreamDestroy_v2(CUstream stream) {
  Initialize();
  const Driver& d = TheDriver();
  if (d.stream_destroy == nullptr) return CUDA_ERROR_NOT_INITIALIZED;
  {
    std::lock_guard<std::mutex> lock(streams_mu);
    KnownStreams().erase(stream);
  }
  stream_generation.fetch_add(1, std::memory_order_acq_rel);
  return d.stream_destroy(stream);
}

// --- cuGetProcAddress and dlsym -----------------------------------------------------------------

CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int cuda_version, cuuint64_t flags,
                             CUdriverProcAddressQueryResult* symbol_status);
CUresult cuGetProcAddress(const char* symbol, void** pfn, int cuda_version, cuuint64_t flags);

}  // extern "C"

namespace {

// Puts this library's function in *pfn where it serves `symbol` as the runtime asks for it (by
// base name and the CUDA version it was built for; per-thread-stream forms by flag).
void Substitute(const char* symbol, void** pfn, int cuda_version, cuuint64_t flags) {
  const bool per_thread = (flags & CU_GET_PROC_ADDRESS_PER_THREAD_DEFAULT_STREAM) != 0;
  struct Served {
    const char* name;
    int min_version;  // the version from which the name means the function served here
    void* plain;
    void* per_thread;
  };
  static const Served served[] = {
      {"cuMemAlloc", 3020, reinterpret_cast<void*>(&cuMemAlloc_v2), nullptr},
      {"cuMemFree", 3020, reinterpret_cast<void*>(&cuMemFree_v2), nullptr},
      {"cuMemAllocPitch", 3020, reinterpret_cast<void*>(&cuMemAllocPitch_v2), nullptr},
      {"cuMemGetInfo", 3020, reinterpret_cast<void*>(&cuMemGetInfo_v2), nullptr},
      {"cuMemAllocAsync", 11020, reinterpret_cast<void*>(&cuMemAllocAsync),
       reinterpret_cast<void*>(&MemAllocAsyncPtsz)},
      {"cuMemFreeAsync", 11020, reinterpret_cast<void*>(&cuMemFreeAsync),
       reinterpret_cast<void*>(&MemFreeAsyncPtsz)},
      {"cuStreamBeginCapture", 10010, reinterpret_cast<void*>(&cuStreamBeginCapture_v2),
       reinterpret_cast<void*>(&BeginCapturePtsz)},
      {"cuStreamEndCapture", 10000, reinterpret_cast<void*>(&cuStreamEndCapture),
       reinterpret_cast<void*>(&EndCapturePtsz)},
      {"cuStreamCreate", 2000, reinterpret_cast<void*>(&cuStreamCreate), nullptr},
      {"cuStreamCreateWithPriority", 5050, reinterpret_cast<void*>(&cuStreamCreateWithPriority),
       nullptr},
      {"cuStreamDestroy", 4000, reinterpret_cast<void*>(&cuStreamDestroy_v2), nullptr},
  };
  if (std::strcmp(symbol, "cuGetProcAddress") == 0) {
    *pfn = cuda_version >= 12000 ? reinterpret_cast<void*>(&cuGetProcAddress_v2)
                                 : reinterpret_cast<void*>(&cuGetProcAddress);
    return;
  }
  for (const Served& entry : served) {
    if (std::strcmp(symbol, entry.name) != 0 || cuda_version < entry.min_version) continue;
    void* ours = per_thread && entry.per_thread != nullptr ? entry.per_thread : entry.plain;
    *pfn = ours;
    return;
  }
}

}  // namespace

extern "C" {

CUresult cuGetProcAddress_v2(const char* symbol, void** pfn, int cuda_version, cuuint64_t flags,
                             CUdriverProcAddressQueryResult* symbol_status) {
  const Driver& d = TheDriver();
  if (d.get_proc_address_v2 == nullptr) return CUDA_ERROR_NOT_INITIALIZED;
  const CUresult result = d.get_proc_address_v2(symbol, pfn, cuda_version, flags, symbol_status);
  if (result == CUDA_SUCCESS && pfn != nullptr && *pfn != nullptr && symbol != nullptr) {
    Substitute(symbol, pfn, cuda_version, flags);
  }
  return result;
}

CUresult cuGetProcAddress(const char* symbol, void** pfn, int cuda_version, cuuint64_t flags) {
  const Driver& d = TheDriver();
  if (d.get_proc_address_v1 == nullptr) return CUDA_ERROR_NOT_INITIALIZED;
  const CUresult result = d.get_proc_address_v1(symbol, pfn, cuda_version, flags);
  if (result == CUDA_SUCCESS && pfn != nullptr && *pfn != nullptr && symbol != nullptr) {
    Substitute(symbol, pfn, cuda_version, flags);
  }
  return result;
}

// Answers the two cuGetProcAddress names with this library's; everything else, and every lookup
// made from inside libtidepool.so.1 (whose own driver table must get the real driver, or its
// allocations would come back here), goes to glibc's dlsym with the caller's handle.
void* dlsym(void* handle, const char* symbol) {
  DlsymFn real = RealDlsym();
  if (std::strncmp(symbol, "cuGetProcAddress", 16) == 0) {
    Dl_info caller;
    const bool from_tidepool =
        dladdr(__builtin_return_address(0), &caller) != 0 && caller.dli_fname != nullptr &&
        std::strstr(caller.dli_fname, "libtidepool.so") != nullptr;
    if (!from_tidepool) {
      if (std::strcmp(symbol, "cuGetProcAddress_v2") == 0) {
        return reinterpret_cast<void*>(&cuGetProcAddress_v2);
      }
      if (std::strcmp(symbol, "cuGetProcAddress") == 0) {
        return reinterpret_cast<void*>(&cuGetProcAddress);
      }
    }
  }
  return real(handle, symbol);
}

}  // extern "C"

// For programs linked with a shared cudart: its own memory calls, served the same way.
using cudaError_t = int;

namespace {

constexpr cudaError_t kCudaSuccess = 0;
constexpr cudaError_t kCudaErrorInvalidValue = 1;
constexpr cudaError_t kCudaErrorMemoryAllocation = 2;

cudaError_t ToCudaError(CUresult result) {
  switch (result) {
    case CUDA_SUCCESS:
      return kCudaSuccess;
    case CUDA_ERROR_OUT_OF_MEMORY:
      return kCudaErrorMemoryAllocation;
    default:
      return kCudaErrorInvalidValue;
  }
}

// The real cudart function of `name` (the next definition after this library's).
template <typename Fn>
Fn NextCudart(const char* name) {
  return reinterpret_cast<Fn>(RealDlsym()(RTLD_NEXT, name));
}

// cudart's entry points first make sure the current device's primary context is current (its
// lazy initialization, and the device cudaSetDevice chose). A cudaFree(NULL) does exactly that,
// but it is not free, and during a stream capture it would invalidate the capture: it is made
// only when the current context is not the primary context of cudart's current device.
void InitializeCudart() {
  using GetDevice = cudaError_t (*)(int*);
  static const auto real_get_device = NextCudart<GetDevice>("cudaGetDevice");
  static const auto real_free = NextCudart<cudaError_t (*)(void*)>("cudaFree");
  int device = -1;
  if (real_get_device != nullptr && real_get_device(&device) == kCudaSuccess &&
      device == CurrentDevice()) {
    return;
  }
  if (real_free != nullptr) real_free(nullptr);
}

}  // namespace

extern "C" {

cudaError_t cudaMalloc(void** dev_ptr, size_t size) {
  if (dev_ptr == nullptr) return kCudaErrorInvalidValue;
  InitializeCudart();
  if (size == 0) {
    *dev_ptr = nullptr;
    return kCudaSuccess;
  }
  CUdeviceptr ptr = 0;
  const CUresult result = SynchronousAllocate(&ptr, size);
  *dev_ptr = result == CUDA_SUCCESS ? reinterpret_cast<void*>(ptr) : nullptr;
  return ToCudaError(result);
}

cudaError_t cudaFree(void* dev_ptr) {
  if (dev_ptr == nullptr) {
    InitializeCudart();
    return kCudaSuccess;
  }
  return ToCudaError(SynchronousFree(reinterpret_cast<CUdeviceptr>(dev_ptr)));
}

cudaError_t cudaMallocAsync(void** dev_ptr, size_t size, CUstream stream) {
  if (dev_ptr == nullptr) return kCudaErrorInvalidValue;
  InitializeCudart();
  CUdeviceptr ptr = 0;
  const CUresult result = AsyncAllocate(&ptr, size, stream, /*per_thread=*/false);
  *dev_ptr = result == CUDA_SUCCESS ? reinterpret_cast<void*>(ptr) : nullptr;
  return ToCudaError(result);
}

cudaError_t cudaFreeAsync(void* dev_ptr, CUstream stream) {
  if (dev_ptr == nullptr) return kCudaSuccess;
  return ToCudaError(AsyncFree(reinterpret_cast<CUdeviceptr>(dev_ptr), stream, false));
}

}  // extern "C"
