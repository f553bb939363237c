// A route's filter: which allocations a routing entry (pool_manager.h) sends to its pool.
//
//   * the calling thread: every allocation the thread that began the route makes (sglang's
//     symmetric-memory context, PyTorch's use_mem_pool);
//   * a stream: allocations on that stream, by its unique id (CachingAllocator::StreamIdOf: while
//     the stream is capturing it has another id, so a stream route begun outside a capture does
//     not match its allocations inside one; use a capture route for those);
//   * a capture: allocations on any stream taking part in that CUDA graph capture;
//   * everyone: every allocation on the device;
//   * a callable: allocations whose stream a function accepts, evaluated for each routed
//     allocation while the entry exists. This is PyTorch's pool hook, whose filter is an opaque
//     std::function (the current thread, every stream, or the streams of one capture);
//     integrations/torch wraps it. Callable entries are kept with the stream, capture and
//     everyone entries, so they cost nothing while none exists.
#ifndef TIDEPOOL_POOL_ROUTE_H_
#define TIDEPOOL_POOL_ROUTE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <utility>

#include "absl/strings/str_format.h"
#include "allocator/device.h"

namespace tidepool {

struct RouteFilter {
  enum class Kind { kCurrentThread, kStream, kCapture, kEveryone, kCallable };
  using Callable = std::function<bool(Stream)>;

  Kind kind = Kind::kCurrentThread;
  StreamId stream_id = 0;   // kStream
  uint64_t capture_id = 0;  // kCapture
  std::shared_ptr<const Callable> callable;  // kCallable

  static RouteFilter CurrentThread() { return RouteFilter{Kind::kCurrentThread}; }
  static RouteFilter OnStream(StreamId id) { return RouteFilter{Kind::kStream, id, 0}; }
  static RouteFilter InCapture(uint64_t id) { return RouteFilter{Kind::kCapture, 0, id}; }
  static RouteFilter Everyone() { return RouteFilter{Kind::kEveryone}; }
  static RouteFilter Accepting(std::shared_ptr<const Callable> callable) {
    return RouteFilter{Kind::kCallable, 0, 0, std::move(callable)};
  }

  friend bool operator==(const RouteFilter& a, const RouteFilter& b) {
    return a.kind == b.kind && a.stream_id == b.stream_id && a.capture_id == b.capture_id &&
           a.callable == b.callable;
  }

  std::string ToString() const {
    switch (kind) {
      case Kind::kCurrentThread:
        return "current thread";
      case Kind::kStream:
        return absl::StrFormat("stream %u", stream_id);
      case Kind::kCapture:
        return absl::StrFormat("capture %u", capture_id);
      case Kind::kEveryone:
        return "everyone";
      case Kind::kCallable:
        return "a callable";
    }
    return "unknown";
  }
};

}  // namespace tidepool

#endif  // TIDEPOOL_POOL_ROUTE_H_
