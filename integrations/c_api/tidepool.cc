// The C API (tidepool.h) over the process's runtime (global_runtime.h).
//
// Each function is a thin translation: C arguments to C++ types, one call into the runtime, its
// pool manager or its allocator, and the absl::Status that comes back to a tidepool_status code,
// with the message kept for the calling thread. Nothing here decides semantics; the C++ API
// does. No C++ exception crosses the boundary: host memory running out inside tidepool is
// TIDEPOOL_OUT_OF_MEMORY, any other exception TIDEPOOL_INTERNAL.
#include "integrations/c_api/tidepool.h"
#include "integrations/c_api/c_status.h"

#include <cstring>
#include <exception>
#include <memory>
#include <new>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "allocator/caching_allocator.h"
#include "allocator/device.h"
#include "allocator/thread_exit_safe.h"
#include "graph/capture.h"
#include "nccl/global_symmetric_registry.h"
#include "nccl/symmetric_registry.h"
#include "allocator/callback_segments.h"
#include "runtime/global_runtime.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"
#include "runtime/runtime.h"

namespace tidepool {
namespace c_api {
namespace {

PoolId ToPoolId(tidepool_pool_id pool) { return PoolId{pool.first, pool.second}; }
tidepool_pool_id ToC(PoolId pool) { return tidepool_pool_id{pool.first, pool.second}; }

absl::StatusOr<PoolManager*> PoolsOf(int device) {
  absl::StatusOr<Runtime*> runtime = GlobalRuntime();
  if (!runtime.ok()) return runtime.status();
  return (*runtime)->Pools(device);
}

// The symmetric pools of the process's runtime.
absl::StatusOr<SymmetricRegistry*> Symmetric() { return GlobalSymmetricRegistry(); }

// The pool manager of `device`, once `pool` is known to be a symmetric pool there (NOT_FOUND
// otherwise).
absl::StatusOr<PoolManager*> SymmetricPoolsOf(int device, PoolId pool) {
  absl::StatusOr<SymmetricRegistry*> registry = Symmetric();
  if (!registry.ok()) return registry.status();
  absl::StatusOr<SymmetricPoolRef> found = (*registry)->Find(device, pool);
  if (!found.ok()) return found.status();
  return PoolsOf(device);
}

absl::StatusOr<RouteFilter> ToRouteFilter(PoolManager& pools, int kind, uint64_t value) {
  switch (kind) {
    case TIDEPOOL_ROUTE_CURRENT_THREAD:
    case TIDEPOOL_ROUTE_EVERYONE:
      if (value != 0) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "filter value %u given for filter kind %d, which takes none (pass 0)", value, kind));
      }
      return kind == TIDEPOOL_ROUTE_CURRENT_THREAD ? RouteFilter::CurrentThread()
                                                   : RouteFilter::Everyone();
    case TIDEPOOL_ROUTE_STREAM: {
      Stream stream = reinterpret_cast<Stream>(static_cast<uintptr_t>(value));
      absl::StatusOr<StreamId> id = pools.allocator()->StreamIdOf(stream);
      if (!id.ok()) return id.status();
      return RouteFilter::OnStream(*id);
    }
    case TIDEPOOL_ROUTE_CAPTURE:
      if (value == 0) {
        return absl::InvalidArgumentError("capture id 0 names no capture");
      }
      return RouteFilter::InCapture(value);
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "filter kind %d is not a tidepool_route_filter (TIDEPOOL_ROUTE_CURRENT_THREAD, _STREAM, "
          "_CAPTURE or _EVERYONE)",
          kind));
  }
}

// Copies `json` out as tidepool.h's observability calls say.
absl::Status CopyOut(const std::string& json, char* buffer, size_t capacity, size_t* needed) {
  const size_t with_nul = json.size() + 1;
  if (needed != nullptr) *needed = with_nul;
  if (buffer == nullptr) {
    if (capacity == 0) return absl::OkStatus();
    return absl::InvalidArgumentError(absl::StrFormat(
        "buffer is NULL but capacity is %u (pass 0 to ask only the size)", capacity));
  }
  if (capacity < with_nul) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "a buffer of %u bytes is too small for the %u bytes of JSON (NUL included); nothing "
        "was written",
        capacity, with_nul));
  }
  std::memcpy(buffer, json.c_str(), with_nul);
  return absl::OkStatus();
}

// The JSON of tidepool_stats_json or tidepool_snapshot_json: the device's when `pool` is NULL.
template <typename OfDevice, typename OfPool>
absl::Status ObservabilityJson(int device, const tidepool_pool_id* pool, char* buffer,
                               size_t capacity, size_t* needed, OfDevice of_device,
                               OfPool of_pool) {
  absl::StatusOr<PoolManager*> pools = PoolsOf(device);
  if (!pools.ok()) return pools.status();
  absl::StatusOr<std::string> json =
      pool == nullptr ? absl::StatusOr<std::string>(of_device(*(*pools)->allocator()))
                      : of_pool(**pools, ToPoolId(*pool));
  if (!json.ok()) return json.status();
  return CopyOut(*json, buffer, capacity, needed);
}

absl::StatusOr<graph::CaptureOptions> ToCaptureOptions(const tidepool_pool_id* share_pool,
                                                        int mode) {
  graph::CaptureOptions options;
  switch (mode) {
    case TIDEPOOL_CAPTURE_MODE_GLOBAL:
      options.mode = CaptureMode::kGlobal;
      break;
    case TIDEPOOL_CAPTURE_MODE_THREAD_LOCAL:
      options.mode = CaptureMode::kThreadLocal;
      break;
    case TIDEPOOL_CAPTURE_MODE_RELAXED:
      options.mode = CaptureMode::kRelaxed;
      break;
    default:
      return absl::InvalidArgumentError(absl::StrFormat(
          "mode %d is not a tidepool_capture_mode (TIDEPOOL_CAPTURE_MODE_GLOBAL, _THREAD_LOCAL or "
          "_RELAXED)",
          mode));
  }
  if (share_pool != nullptr) {
    options.pool = ToPoolId(*share_pool);
    // graph::CaptureOptions reads the default pool as "a new private pool"; here that is NULL.
    if (options.pool.is_default()) {
      return absl::InvalidArgumentError(
          "share_pool is the default pool {0,0}, which no capture can share (pass NULL for a new "
          "private pool)");
    }
  }
  return options;
}

}  // namespace
}  // namespace c_api
}  // namespace tidepool

// The opaque types of tidepool.h: a C++ Capture or Graph on the heap. The C++ object does the
// cleanup when one is destroyed without being ended (graph/capture.h).
struct tidepool_capture {
  explicit tidepool_capture(tidepool::graph::Capture begun) : capture(std::move(begun)) {}
  tidepool::graph::Capture capture;
};

struct tidepool_graph {
  explicit tidepool_graph(tidepool::graph::Graph made) : graph(std::move(made)) {}
  tidepool::graph::Graph graph;
};

using tidepool::BlockHome;
using tidepool::CachingAllocator;
using tidepool::CallbackSegments;
using tidepool::PoolId;
using tidepool::PoolManager;
using tidepool::PoolOptions;
using tidepool::RouteFilter;
using tidepool::Runtime;
using tidepool::SymmetricPool;
using tidepool::SymmetricRegistry;
using tidepool::c_api::Symmetric;
using tidepool::c_api::SymmetricPoolsOf;
using tidepool::c_api::Guarded;
using tidepool::c_api::NullArgument;
using tidepool::c_api::PoolsOf;
using tidepool::c_api::ToC;
using tidepool::c_api::ToPoolId;

extern "C" {

int tidepool_api_version(void) { return TIDEPOOL_API_VERSION; }

const char* tidepool_last_error(void) {
  const tidepool::c_api::LastError* last = tidepool::c_api::LastErrors::Find();
  return last == nullptr ? "" : last->message.c_str();
}

const char* tidepool_status_name(tidepool_status status) {
  switch (status) {
    case TIDEPOOL_OK:
      return "TIDEPOOL_OK";
    case TIDEPOOL_INVALID_ARGUMENT:
      return "TIDEPOOL_INVALID_ARGUMENT";
    case TIDEPOOL_OUT_OF_MEMORY:
      return "TIDEPOOL_OUT_OF_MEMORY";
    case TIDEPOOL_NOT_FOUND:
      return "TIDEPOOL_NOT_FOUND";
    case TIDEPOOL_FAILED_PRECONDITION:
      return "TIDEPOOL_FAILED_PRECONDITION";
    case TIDEPOOL_UNAVAILABLE:
      return "TIDEPOOL_UNAVAILABLE";
    case TIDEPOOL_INTERNAL:
      return "TIDEPOOL_INTERNAL";
    case TIDEPOOL_DEADLINE_EXCEEDED:
      return "TIDEPOOL_DEADLINE_EXCEEDED";
  }
  return "unknown tidepool_status";
}

tidepool_status tidepool_init_simulated(int device_count, size_t bytes_per_device) {
  return Guarded("tidepool_init_simulated", [&] {
    return tidepool::InitSimulatedGlobalRuntime(device_count, bytes_per_device);
  });
}

tidepool_status tidepool_device_count(int* count) {
  return Guarded("tidepool_device_count", [&]() -> absl::Status {
    if (count == nullptr) return NullArgument("count");
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    *count = (*runtime)->device_count();
    return absl::OkStatus();
  });
}

tidepool_status tidepool_malloc(void** ptr, size_t size, int device, void* stream) {
  return Guarded("tidepool_malloc", [&]() -> absl::Status {
    if (ptr == nullptr) return NullArgument("ptr");
    *ptr = nullptr;
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    absl::StatusOr<void*> block = (*runtime)->Allocate(device, size, stream);
    if (!block.ok()) return block.status();
    *ptr = *block;
    return absl::OkStatus();
  });
}

tidepool_status tidepool_free_async(void* ptr, void* stream) {
  return Guarded("tidepool_free_async", [&]() -> absl::Status {
    if (ptr == nullptr) return absl::OkStatus();
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    return (*runtime)->FreeOnStream(ptr, stream);
  });
}

tidepool_status tidepool_free(void* ptr) {
  return Guarded("tidepool_free", [&]() -> absl::Status {
    if (ptr == nullptr) return absl::OkStatus();
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    return (*runtime)->Free(ptr);
  });
}

tidepool_status tidepool_record_stream(void* ptr, void* stream) {
  return Guarded("tidepool_record_stream", [&]() -> absl::Status {
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    return (*runtime)->RecordStream(ptr, stream);
  });
}

tidepool_status tidepool_empty_cache(int device) {
  return Guarded("tidepool_empty_cache", [&]() -> absl::Status {
    absl::StatusOr<PoolManager*> pools = PoolsOf(device);
    if (!pools.ok()) return pools.status();
    return (*pools)->allocator()->EmptyCache();
  });
}

tidepool_status tidepool_new_pool_id(tidepool_pool_id* pool) {
  return Guarded("tidepool_new_pool_id", [&]() -> absl::Status {
    if (pool == nullptr) return NullArgument("pool");
    *pool = ToC(tidepool::NewUserPoolId());
    return absl::OkStatus();
  });
}

tidepool_status tidepool_new_graph_pool_id(tidepool_pool_id* pool) {
  return Guarded("tidepool_new_graph_pool_id", [&]() -> absl::Status {
    if (pool == nullptr) return NullArgument("pool");
    *pool = ToC(tidepool::NewGraphPoolId());
    return absl::OkStatus();
  });
}

tidepool_status tidepool_begin_allocate_current_thread_to_pool(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_begin_allocate_current_thread_to_pool", [&]() -> absl::Status {
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    return (*runtime)->BeginAllocateCurrentThreadToPool(device, ToPoolId(pool));
  });
}

tidepool_status tidepool_begin_allocate_to_pool(int device, tidepool_pool_id pool, int filter_kind,
                                                uint64_t filter_value) {
  return Guarded("tidepool_begin_allocate_to_pool", [&]() -> absl::Status {
    absl::StatusOr<PoolManager*> pools = PoolsOf(device);
    if (!pools.ok()) return pools.status();
    absl::StatusOr<RouteFilter> filter =
        tidepool::c_api::ToRouteFilter(**pools, filter_kind, filter_value);
    if (!filter.ok()) return filter.status();
    return (*pools)->Begin(ToPoolId(pool), *filter);
  });
}

tidepool_status tidepool_end_allocate_to_pool(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_end_allocate_to_pool", [&]() -> absl::Status {
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    return (*runtime)->EndAllocateToPool(device, ToPoolId(pool));
  });
}

tidepool_status tidepool_release_pool(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_release_pool", [&]() -> absl::Status {
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    return (*runtime)->ReleasePool(device, ToPoolId(pool));
  });
}

tidepool_status tidepool_create_callback_pool(
    int device, tidepool_pool_id pool,
    void* (*alloc_segment)(size_t size, int device, void* context),
    void (*free_segment)(void* ptr, size_t size, int device, void* context), void* context) {
  return Guarded("tidepool_create_callback_pool", [&]() -> absl::Status {
    if (alloc_segment == nullptr) return NullArgument("alloc_segment");
    if (free_segment == nullptr) return NullArgument("free_segment");
    const PoolId id = ToPoolId(pool);
    if (id.is_default()) {
      return absl::InvalidArgumentError(
          "the default pool {0,0} takes its memory from the device and cannot be given "
          "callbacks");
    }
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    absl::StatusOr<PoolManager*> pools = (*runtime)->Pools(device);
    if (!pools.ok()) return pools.status();
    auto source = std::make_unique<CallbackSegments>(alloc_segment, free_segment, context, device);
    PoolOptions options;
    options.source = source.get();
    // One reference, no routing entry; refused (changing nothing) for an id the device has had.
    absl::Status created = (*pools)->Create(id, options);
    if (absl::IsAlreadyExists(created)) {
      return absl::FailedPreconditionError(absl::StrCat(
          created.message(), " (a callback pool needs a new id: tidepool_new_pool_id)"));
    }
    if (!created.ok()) return created;
    (*runtime)->KeepSegmentSource(std::move(source));
    return absl::OkStatus();
  });
}

tidepool_status tidepool_trim_pool(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_trim_pool", [&]() -> absl::Status {
    absl::StatusOr<PoolManager*> pools = PoolsOf(device);
    if (!pools.ok()) return pools.status();
    return (*pools)->Trim(ToPoolId(pool));
  });
}

tidepool_status tidepool_pool_of(const void* ptr, int* device, tidepool_pool_id* pool) {
  return Guarded("tidepool_pool_of", [&]() -> absl::Status {
    if (device == nullptr) return NullArgument("device");
    if (pool == nullptr) return NullArgument("pool");
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    absl::StatusOr<BlockHome> home = (*runtime)->HomeOf(ptr);
    if (!home.ok()) return home.status();
    *device = home->device;
    *pool = ToC(home->pool);
    return absl::OkStatus();
  });
}

tidepool_status tidepool_capture_begin(int device, void* stream,
                                       const tidepool_pool_id* share_pool, int mode,
                                       tidepool_capture** capture) {
  return Guarded("tidepool_capture_begin", [&]() -> absl::Status {
    if (capture == nullptr) return NullArgument("capture");
    *capture = nullptr;
    absl::StatusOr<tidepool::graph::CaptureOptions> options =
        tidepool::c_api::ToCaptureOptions(share_pool, mode);
    if (!options.ok()) return options.status();
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    absl::StatusOr<PoolManager*> pools = (*runtime)->Pools(device);
    if (!pools.ok()) return pools.status();
    // The capture runs on the device with streams and graphs (allocator/graph_device.h); the
    // pools' allocator holds only the narrow seam.
    absl::StatusOr<tidepool::GraphDevice*> graph_device = (*runtime)->GraphDeviceOf(device);
    if (!graph_device.ok()) return graph_device.status();
    absl::StatusOr<tidepool::graph::Capture> begun =
        tidepool::graph::Capture::Begin(*graph_device, *pools, stream, *options);
    if (!begun.ok()) return begun.status();
    // If this throws, `begun` abandons the capture on the way out: nothing is left behind.
    *capture = new tidepool_capture(*std::move(begun));
    return absl::OkStatus();
  });
}

tidepool_status tidepool_capture_end(tidepool_capture* capture, tidepool_graph** graph) {
  return Guarded("tidepool_capture_end", [&]() -> absl::Status {
    // Owned from here on, so that the capture is consumed on every path (an exception
    // included): destroying a Capture that was not ended abandons it.
    std::unique_ptr<tidepool_capture> owned(capture);
    if (graph != nullptr) *graph = nullptr;
    if (owned == nullptr) return NullArgument("capture");
    if (graph == nullptr) {
      owned->capture.Abandon().IgnoreError();  // the error below is what the caller must hear
      return absl::InvalidArgumentError(
          "graph is NULL; the capture was abandoned all the same (tidepool_capture_end always "
          "consumes it)");
    }
    absl::StatusOr<tidepool::graph::Graph> made = owned->capture.End();
    if (!made.ok()) return made.status();
    // If this throws, `made` destroys the graph and drops its reference on the way out.
    *graph = new tidepool_graph(*std::move(made));
    return absl::OkStatus();
  });
}

tidepool_status tidepool_capture_abandon(tidepool_capture* capture) {
  return Guarded("tidepool_capture_abandon", [&]() -> absl::Status {
    std::unique_ptr<tidepool_capture> owned(capture);
    if (owned == nullptr) return NullArgument("capture");
    return owned->capture.Abandon();
  });
}

tidepool_status tidepool_capture_pool(const tidepool_capture* capture, tidepool_pool_id* pool) {
  return Guarded("tidepool_capture_pool", [&]() -> absl::Status {
    if (capture == nullptr) return NullArgument("capture");
    if (pool == nullptr) return NullArgument("pool");
    *pool = ToC(capture->capture.pool());
    return absl::OkStatus();
  });
}

tidepool_status tidepool_graph_launch(tidepool_graph* graph, void* stream) {
  return Guarded("tidepool_graph_launch", [&]() -> absl::Status {
    if (graph == nullptr) return NullArgument("graph");
    return graph->graph.Launch(stream);
  });
}

tidepool_status tidepool_graph_pool(const tidepool_graph* graph, tidepool_pool_id* pool) {
  return Guarded("tidepool_graph_pool", [&]() -> absl::Status {
    if (graph == nullptr) return NullArgument("graph");
    if (pool == nullptr) return NullArgument("pool");
    *pool = ToC(graph->graph.pool());
    return absl::OkStatus();
  });
}

tidepool_status tidepool_graph_destroy(tidepool_graph* graph) {
  return Guarded("tidepool_graph_destroy", [&]() -> absl::Status {
    std::unique_ptr<tidepool_graph> owned(graph);
    if (owned == nullptr) return absl::OkStatus();
    return owned->graph.Reset();
  });
}

tidepool_status tidepool_graph_pool_create(int device, tidepool_pool_id* pool) {
  return Guarded("tidepool_graph_pool_create", [&]() -> absl::Status {
    if (pool == nullptr) return NullArgument("pool");
    absl::StatusOr<PoolManager*> pools = PoolsOf(device);
    if (!pools.ok()) return pools.status();
    // What graph::SharedPool::Create does, with the reference handed to the caller rather than
    // to an RAII handle: tidepool_release_pool drops it.
    const PoolId id = tidepool::NewGraphPoolId();
    absl::Status created = (*pools)->Create(id, tidepool::PoolOptions{});
    if (!created.ok()) return created;
    *pool = ToC(id);
    return absl::OkStatus();
  });
}

tidepool_status tidepool_symmetric_pool_create(int device, void* communicator, size_t growth_bytes,
                                               double agreement_timeout_seconds,
                                               tidepool_pool_id* pool) {
  return Guarded("tidepool_symmetric_pool_create", [&]() -> absl::Status {
    if (pool == nullptr) return NullArgument("pool");
    if (communicator == nullptr) return NullArgument("communicator");
    if (!(agreement_timeout_seconds > 0)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "agreement timeout %g s: it must be positive", agreement_timeout_seconds));
    }
    absl::StatusOr<SymmetricRegistry*> registry = Symmetric();
    if (!registry.ok()) return registry.status();
    SymmetricPool::Options options;
    options.growth_bytes = growth_bytes;
    options.agreement_timeout = absl::Seconds(agreement_timeout_seconds);
    absl::StatusOr<PoolId> made =
        (*registry)->Create(device, static_cast<ncclComm_t>(communicator), options);
    if (!made.ok()) return made.status();
    *pool = ToC(*made);
    return absl::OkStatus();
  });
}

tidepool_status tidepool_symmetric_pool_reserve(int device, tidepool_pool_id pool, size_t bytes) {
  return Guarded("tidepool_symmetric_pool_reserve", [&]() -> absl::Status {
    absl::StatusOr<SymmetricRegistry*> registry = Symmetric();
    if (!registry.ok()) return registry.status();
    return (*registry)->Reserve(device, ToPoolId(pool), bytes);
  });
}

tidepool_status tidepool_symmetric_pool_trim(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_symmetric_pool_trim", [&]() -> absl::Status {
    absl::StatusOr<SymmetricRegistry*> registry = Symmetric();
    if (!registry.ok()) return registry.status();
    return (*registry)->Trim(device, ToPoolId(pool));
  });
}

tidepool_status tidepool_symmetric_pool_destroy(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_symmetric_pool_destroy", [&]() -> absl::Status {
    absl::StatusOr<SymmetricRegistry*> registry = Symmetric();
    if (!registry.ok()) return registry.status();
    return (*registry)->Destroy(device, ToPoolId(pool));
  });
}

tidepool_status tidepool_symmetric_lookup(const void* ptr, void** window, size_t* offset) {
  return Guarded("tidepool_symmetric_lookup", [&]() -> absl::Status {
    if (window == nullptr) return NullArgument("window");
    if (offset == nullptr) return NullArgument("offset");
    absl::StatusOr<SymmetricRegistry*> registry = Symmetric();
    if (!registry.ok()) return registry.status();
    absl::StatusOr<SymmetricPool::Location> location = (*registry)->Lookup(ptr);
    if (!location.ok()) return location.status();
    *window = static_cast<void*>(location->window);
    *offset = location->offset;
    return absl::OkStatus();
  });
}

tidepool_status tidepool_symmetric_begin(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_symmetric_begin", [&]() -> absl::Status {
    absl::StatusOr<PoolManager*> pools = SymmetricPoolsOf(device, ToPoolId(pool));
    if (!pools.ok()) return pools.status();
    // BeginHeld: a pool destroyed meanwhile is refused, not made anew (nccl/symmetric_scope.h).
    return (*pools)->BeginHeld(ToPoolId(pool), RouteFilter::CurrentThread());
  });
}

tidepool_status tidepool_symmetric_end(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_symmetric_end", [&]() -> absl::Status {
    absl::StatusOr<PoolManager*> pools = SymmetricPoolsOf(device, ToPoolId(pool));
    if (!pools.ok()) return pools.status();
    if (absl::Status ended = (*pools)->End(ToPoolId(pool), RouteFilter::CurrentThread());
        !ended.ok()) {
      return ended;
    }
    // The begin's reference: it cannot be the registry's own while the begin held one.
    return (*pools)->Release(ToPoolId(pool));
  });
}

tidepool_status tidepool_stats_json(int device, const tidepool_pool_id* pool, char* buffer,
                                    size_t capacity, size_t* needed) {
  return Guarded("tidepool_stats_json", [&] {
    return tidepool::c_api::ObservabilityJson(
        device, pool, buffer, capacity, needed,
        [](const CachingAllocator& allocator) { return allocator.GetStats().ToJson(); },
        [](PoolManager& pools, PoolId id) -> absl::StatusOr<std::string> {
          absl::StatusOr<tidepool::AllocatorStats> stats = pools.Stats(id);
          if (!stats.ok()) return stats.status();
          return stats->ToJson();
        });
  });
}

tidepool_status tidepool_snapshot_json(int device, const tidepool_pool_id* pool, char* buffer,
                                       size_t capacity, size_t* needed) {
  return Guarded("tidepool_snapshot_json", [&] {
    return tidepool::c_api::ObservabilityJson(
        device, pool, buffer, capacity, needed,
        [](const CachingAllocator& allocator) { return allocator.SnapshotJson(); },
        [](PoolManager& pools, PoolId id) { return pools.Snapshot(id); });
  });
}

}  // extern "C"
