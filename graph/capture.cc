// Capture, Graph and SharedPool: see capture.h for what each step is for and the order of steps.
#include "graph/capture.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator.h"
#include "pool/route.h"

namespace tidepool {
namespace graph {
namespace {

// The same status with `context` in front of its message.
absl::Status WithContext(const absl::Status& status, const std::string& context) {
  return absl::Status(status.code(), absl::StrCat(context, ": ", status.message()));
}

}  // namespace

// --- Capture ---------------------------------------------------------------------------------

absl::StatusOr<Capture> Capture::Begin(GraphDevice* device, PoolManager* pools, Stream stream,
                                       const CaptureOptions& options) {
  if (device == nullptr || pools == nullptr) {
    return absl::InvalidArgumentError("tidepool: capture without a device");
  }
  const bool shared = !options.pool.is_default();
  const PoolId pool = shared ? options.pool : NewGraphPoolId();
  if (shared && pool.first == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tidepool: capture into pool %s, which is not a graph pool: a capture shares only graph "
        "pools (ids {n,0}, from a Graph, a SharedPool or tidepool_new_graph_pool_id)",
        pool.ToString()));
  }
  CachingAllocator* allocator = pools->allocator();
  if (device->ordinal() != allocator->device()->ordinal()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tidepool: capture on device %d into the pools of device %d: a capture's device and "
        "pools must be one device's",
        device->ordinal(), allocator->device()->ordinal()));
  }
  // Refusals the device would give come first: the mark harvests completed events, and a call
  // that fails must change nothing.
  if (stream == nullptr) {
    return absl::InvalidArgumentError(
        "tidepool: cannot begin a capture on the legacy default stream (NULL): the default "
        "stream cannot be captured");
  }
  absl::StatusOr<CaptureInfo> before = device->GetCaptureInfo(stream);
  if (!before.ok()) {
    return WithContext(before.status(),
                       absl::StrFormat("tidepool: cannot begin a capture on stream %p", stream));
  }
  if (before->capturing || before->invalidated) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: cannot begin a capture on stream %p, which is capturing already", stream));
  }
  // A shared pool that is unknown or released is refused before the mark too (and checked again
  // as the route is made: its last holder may go meanwhile).
  if (shared) {
    if (absl::Status held = pools->CheckHeld(pool); !held.ok()) {
      return WithContext(held, absl::StrFormat("tidepool: cannot share pool %s in a capture",
                                               pool.ToString()));
    }
  }
  allocator->NoteCaptureBegin();
  absl::StatusOr<uint64_t> capture_id = device->BeginCapture(stream, options.mode);
  if (!capture_id.ok()) {
    allocator->NoteCaptureEnd().IgnoreError();  // undoes the mark just made: cannot fail
    return WithContext(capture_id.status(),
                       absl::StrFormat("tidepool: cannot begin a capture on stream %p", stream));
  }
  // Sharing: the pool must still be held, checked and begun as one step (its last holder may be
  // going away on another thread).
  const RouteFilter route = RouteFilter::InCapture(*capture_id);
  const uint64_t began_at = pools->NextRouteSequence();
  absl::Status routed = shared ? pools->BeginHeld(pool, route)
                               : pools->Begin(pool, route);
  if (!routed.ok()) {
    absl::StatusOr<GraphHandle> graph = device->EndCapture(stream);
    if (graph.ok()) device->DestroyGraph(*graph).IgnoreError();
    allocator->NoteCaptureEnd().IgnoreError();
    if (!shared) return routed;
    return WithContext(routed, absl::StrFormat("tidepool: cannot share pool %s in a capture",
                                               pool.ToString()));
  }
  return Capture(device, pools, stream, pool, *capture_id, began_at);
}

Capture::Capture(Capture&& other) noexcept
    : manager_(std::exchange(other.manager_, nullptr)),
      device_(other.device_),
      stream_(other.stream_),
      pool_(other.pool_),
      capture_id_(other.capture_id_),
      began_at_(other.began_at_) {}

Capture& Capture::operator=(Capture&& other) noexcept {
  if (this != &other) {
    if (active()) Abandon().IgnoreError();
    manager_ = std::exchange(other.manager_, nullptr);
    device_ = other.device_;
    stream_ = other.stream_;
    pool_ = other.pool_;
    capture_id_ = other.capture_id_;
    began_at_ = other.began_at_;
  }
  return *this;
}

Capture::~Capture() {
  if (active()) Abandon().IgnoreError();  // nothing to report to
}

absl::StatusOr<GraphHandle> Capture::Finish() {
  PoolManager* manager = std::exchange(manager_, nullptr);
  CachingAllocator* allocator = manager->allocator();
  // The device first: once the stream stops capturing, nothing new can match the route.
  absl::StatusOr<GraphHandle> graph = device_->EndCapture(stream_);
  absl::Status unrouted = manager->End(pool_, RouteFilter::InCapture(capture_id_));
  if (absl::IsFailedPrecondition(unrouted)) {
    // Someone ended the capture's route by hand (capture.h): the graph is still good. A route
    // this thread began to the pool since, to resume it, is the capture's now.
    unrouted = manager->EndResumedRoute(pool_, began_at_);
  }
  absl::Status unmarked = allocator->NoteCaptureEnd();
  if (!graph.ok()) return graph.status();
  absl::Status first = !unrouted.ok() ? unrouted : unmarked;
  if (!first.ok()) {
    device_->DestroyGraph(*graph).IgnoreError();
    return first;
  }
  return graph;
}

absl::StatusOr<Graph> Capture::End() {
  if (!active()) {
    return absl::FailedPreconditionError("tidepool: end of a capture that has already ended");
  }
  PoolManager* manager = manager_;
  // A failed capture drops its reference (its route is gone already) and says so.
  auto failed = [&](const absl::Status& cause) {
    manager->Release(pool_).IgnoreError();
    return WithContext(cause, absl::StrFormat("tidepool: capture %u on stream %p (pool %s) "
                                              "failed, and was cleaned up: its route and pool "
                                              "reference are gone",
                                              capture_id_, stream_, pool_.ToString()));
  };
  absl::StatusOr<GraphHandle> graph = Finish();
  if (!graph.ok()) return failed(graph.status());
  absl::StatusOr<GraphExecHandle> exec = device_->InstantiateGraph(*graph);
  device_->DestroyGraph(*graph).IgnoreError();  // the executable graph does not need it
  if (!exec.ok()) return failed(exec.status());
  return Graph(device_, manager, *exec, pool_);
}

absl::Status Capture::Abandon() {
  if (!active()) return absl::OkStatus();
  PoolManager* manager = manager_;
  absl::StatusOr<GraphHandle> graph = Finish();
  if (graph.ok()) device_->DestroyGraph(*graph).IgnoreError();
  // The capture was abandoned, so a capture the driver invalidated is no error here.
  return manager->Release(pool_);
}

// --- Graph -----------------------------------------------------------------------------------

Graph::Graph(Graph&& other) noexcept
    : manager_(std::exchange(other.manager_, nullptr)),
      device_(other.device_),
      exec_(other.exec_),
      pool_(other.pool_) {}

Graph& Graph::operator=(Graph&& other) noexcept {
  if (this != &other) {
    Reset().IgnoreError();
    manager_ = std::exchange(other.manager_, nullptr);
    device_ = other.device_;
    exec_ = other.exec_;
    pool_ = other.pool_;
  }
  return *this;
}

Graph::~Graph() { Reset().IgnoreError(); }

absl::Status Graph::Launch(Stream stream) {
  if (!valid()) return absl::FailedPreconditionError("tidepool: launch of an empty graph");
  return device_->LaunchGraph(exec_, stream);
}

absl::Status Graph::Reset() {
  if (!valid()) return absl::OkStatus();
  PoolManager* manager = std::exchange(manager_, nullptr);
  // An executable graph destroyed while a replay runs is freed when the replay completes, and the
  // pool's memory is given back only after a device synchronization (caching_allocator.h).
  absl::Status destroyed = device_->DestroyGraphExec(exec_);
  absl::Status released = manager->Release(pool_);
  return destroyed.ok() ? released : destroyed;
}

// --- SharedPool ------------------------------------------------------------------------------

absl::StatusOr<SharedPool> SharedPool::Create(PoolManager* pools) {
  if (pools == nullptr) return absl::InvalidArgumentError("tidepool: shared pool without a device");
  const PoolId id = NewGraphPoolId();
  if (absl::Status s = pools->Create(id, PoolOptions{}); !s.ok()) return s;
  return SharedPool(pools, id);
}

SharedPool::SharedPool(SharedPool&& other) noexcept
    : manager_(std::exchange(other.manager_, nullptr)), id_(other.id_) {}

SharedPool& SharedPool::operator=(SharedPool&& other) noexcept {
  if (this != &other) {
    Reset().IgnoreError();
    manager_ = std::exchange(other.manager_, nullptr);
    id_ = other.id_;
  }
  return *this;
}

SharedPool::~SharedPool() { Reset().IgnoreError(); }

absl::Status SharedPool::Reset() {
  if (manager_ == nullptr) return absl::OkStatus();
  return std::exchange(manager_, nullptr)->Release(id_);
}

}  // namespace graph
}  // namespace tidepool
