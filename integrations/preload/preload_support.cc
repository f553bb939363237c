// The runtime's side of the interposer: see preload_support.h.
#include "integrations/preload/preload_support.h"

#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator.h"
#include "allocator/mutex.h"
#include "integrations/c_api/c_status.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"
#include "runtime/global_runtime.h"
#include "runtime/runtime.h"

namespace tidepool {
namespace preload {
namespace {

// The routes of the captures underway, by (device, capturing stream).
struct CaptureRoute {
  PoolId pool;
  uint64_t capture_id = 0;
};
Mutex captures_mu;
absl::flat_hash_map<std::pair<int, Stream>, CaptureRoute>& Captures()
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(captures_mu) {
  static auto* captures = new absl::flat_hash_map<std::pair<int, Stream>, CaptureRoute>();
  return *captures;
}

absl::StatusOr<PoolManager*> PoolsOf(int device) {
  absl::StatusOr<Runtime*> runtime = GlobalRuntime();
  if (!runtime.ok()) return runtime.status();
  return (*runtime)->Pools(device);
}

}  // namespace
}  // namespace preload
}  // namespace tidepool

using tidepool::c_api::Guarded;
using tidepool::c_api::NullArgument;
using tidepool::preload::Captures;
using tidepool::preload::PoolsOf;

extern "C" {

tidepool_status tidepool_preload_capture_will_begin(int device) {
  return Guarded("tidepool_preload_capture_will_begin", [&]() -> absl::Status {
    absl::StatusOr<tidepool::PoolManager*> pools = PoolsOf(device);
    if (!pools.ok()) return pools.status();
    (*pools)->allocator()->NoteCaptureBegin();
    return absl::OkStatus();
  });
}

tidepool_status tidepool_preload_capture_abandoned(int device) {
  return Guarded("tidepool_preload_capture_abandoned", [&]() -> absl::Status {
    absl::StatusOr<tidepool::PoolManager*> pools = PoolsOf(device);
    if (!pools.ok()) return pools.status();
    return (*pools)->allocator()->NoteCaptureEnd();
  });
}

tidepool_status tidepool_preload_capture_began(int device, void* stream) {
  return Guarded("tidepool_preload_capture_began", [&]() -> absl::Status {
    absl::StatusOr<tidepool::Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    absl::StatusOr<tidepool::PoolManager*> pools = (*runtime)->Pools(device);
    if (!pools.ok()) return pools.status();
    absl::StatusOr<tidepool::GraphDevice*> graph_device = (*runtime)->GraphDeviceOf(device);
    if (!graph_device.ok()) return graph_device.status();
    absl::StatusOr<tidepool::CaptureInfo> info = (*graph_device)->GetCaptureInfo(stream);
    if (!info.ok()) return info.status();
    if (!info->capturing) {
      return absl::FailedPreconditionError(
          absl::StrFormat("stream %p is not capturing after its capture began", stream));
    }
    const tidepool::PoolId pool = tidepool::NewGraphPoolId();
    if (absl::Status begun =
            (*pools)->Begin(pool, tidepool::RouteFilter::InCapture(info->capture_id));
        !begun.ok()) {
      return begun;
    }
    tidepool::MutexLock lock(&tidepool::preload::captures_mu);
    Captures()[{device, stream}] = tidepool::preload::CaptureRoute{pool, info->capture_id};
    return absl::OkStatus();
  });
}

tidepool_status tidepool_preload_capture_ended(int device, void* stream) {
  return Guarded("tidepool_preload_capture_ended", [&]() -> absl::Status {
    absl::StatusOr<tidepool::PoolManager*> pools = PoolsOf(device);
    if (!pools.ok()) return pools.status();
    tidepool::preload::CaptureRoute route;
    {
      tidepool::MutexLock lock(&tidepool::preload::captures_mu);
      auto found = Captures().find({device, stream});
      if (found == Captures().end()) {
        return absl::FailedPreconditionError(absl::StrFormat(
            "the end of a capture on stream %p of device %d, whose begin tidepool did not see",
            stream, device));
      }
      route = found->second;
      Captures().erase(found);
    }
    absl::Status ended =
        (*pools)->End(route.pool, tidepool::RouteFilter::InCapture(route.capture_id));
    absl::Status unmarked = (*pools)->allocator()->NoteCaptureEnd();
    return ended.ok() ? unmarked : ended;
  });
}

tidepool_status tidepool_preload_private_stream(int device, void** stream) {
  return Guarded("tidepool_preload_private_stream", [&]() -> absl::Status {
    if (stream == nullptr) return NullArgument("stream");
    static tidepool::Mutex mu;
    static auto* streams = new absl::flat_hash_map<int, tidepool::Stream>();
    tidepool::MutexLock lock(&mu);
    auto found = streams->find(device);
    if (found == streams->end()) {
      absl::StatusOr<tidepool::Runtime*> runtime = tidepool::GlobalRuntime();
      if (!runtime.ok()) return runtime.status();
      absl::StatusOr<tidepool::GraphDevice*> graph_device = (*runtime)->GraphDeviceOf(device);
      if (!graph_device.ok()) return graph_device.status();
      absl::StatusOr<tidepool::Stream> made = (*graph_device)->CreateStream();
      if (!made.ok()) return made.status();
      found = streams->emplace(device, *made).first;
    }
    *stream = found->second;
    return absl::OkStatus();
  });
}

tidepool_status tidepool_preload_cached_bytes(int device, size_t* cached) {
  return Guarded("tidepool_preload_cached_bytes", [&]() -> absl::Status {
    if (cached == nullptr) return NullArgument("cached");
    absl::StatusOr<tidepool::PoolManager*> pools = PoolsOf(device);
    if (!pools.ok()) return pools.status();
    const tidepool::AllocatorStats stats = (*pools)->allocator()->GetStats();
    const int64_t free_bytes = stats.reserved_bytes.current - stats.allocated_bytes.current;
    *cached = free_bytes > 0 ? static_cast<size_t>(free_bytes) : 0;
    return absl::OkStatus();
  });
}

}  // extern "C"
