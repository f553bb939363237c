// CUDA graph capture with tidepool: a capture-private pool per graph (or one pool shared by
// several graphs), held for as long as any graph that may replay into it lives.
//
// A graph replays the allocations it captured at the same addresses, every time. So the memory a
// capture allocates must come from a pool that nothing else uses while the graph lives, and must
// never go back to the device while a graph may still replay into it. `Capture` does the four
// things that takes, in this order, and undoes them in reverse:
//
//   1. marks the capture on the device's allocator (CachingAllocator::NoteCaptureBegin), so that
//      nothing queries or synchronizes an event while it runs and frees used on other streams
//      are deferred until it ends (the reuse rules of a capture: caching_allocator.h);
//   2. begins capturing the stream on the device;
//   3. routes every allocation on a stream taking part in this capture (its own stream, and every
//      stream that joined it by waiting on one of its events) to the capture's pool, through a
//      capture-id route (pool/route.h), taking one reference on the pool;
//   4. at End, stops capturing, ends the route and the mark, and instantiates the graph. The
//      `Graph` keeps the reference until it is destroyed.
//
// Graph pools never share their free memory (a pool with a graph id never does: pool_manager.h):
// EmptyCache, out-of-memory recovery and other pools' growth leave them alone, and
// PoolManager::Trim refuses them while anything holds them. When the last graph (or SharedPool)
// holding a pool is destroyed the pool is released: its free memory goes back to the device, and
// blocks still live (a graph's outputs, say) go back when they are freed.
//
// A capture that fails (the driver invalidated it, instantiation failed) or is abandoned (the
// Capture is destroyed without End) ends its route and its mark, destroys what the driver made,
// and drops its pool reference: nothing is leaked, and the allocator goes on as before.
//
// A thread inside a capture that routes itself to another pool (PoolScope: sglang's symmetric
// memory) pauses the capture's routing for that thread only, since the newest route wins, and
// gets it back exactly when the scope ends; references stay balanced (docs/graphs.md).
//
// Routes begun by hand belong to whoever began them, with one exception, for sglang's own call
// order, which pauses a capture without a scope: it ends the capture's route by hand
// (PoolManager::End of the capture's pool), routes to its own pool and back, and resumes with a
// current-thread Begin of the capture's pool. At End (or Abandon), a capture whose route someone
// else ended still ends and returns its graph; and a current-thread route to its pool that the
// ending thread began after the capture began is the capture's route resumed: End ends it and
// drops the reference its Begin took, as PyTorch's capture end does.
//
// The device is a GraphDevice (allocator/graph_device.h), passed in beside the pools: the caching
// allocator holds only the narrow Device seam, which has no streams or graphs, so capture, launch
// and destruction of graphs go to the GraphDevice the caller names (the one the pools' allocator
// drives; the runtime's `GraphDeviceOf` gives it for an ordinal).
//
// Thread safety: a Capture and a Graph are used by one thread at a time; different captures and
// graphs may be used from different threads at once.
#ifndef TIDEPOOL_GRAPH_CAPTURE_H_
#define TIDEPOOL_GRAPH_CAPTURE_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"

namespace tidepool {
namespace graph {

// How a capture is begun.
struct CaptureOptions {
  // kDefaultPool (the default): a new private pool, with a new graph pool id. A graph pool id
  // that a live Graph, Capture or SharedPool holds: share that pool (PyTorch's
  // `pool=graph_pool_handle()` or `pool=other_graph.pool()`). Graphs that share a pool must
  // never replay at the same time, since they reuse each other's free memory.
  PoolId pool = kDefaultPool;
  // Which unsafe calls the capture forbids (allocator/graph_device.h). kGlobal is CUDA's and
  // PyTorch's default.
  CaptureMode mode = CaptureMode::kGlobal;
};

// An instantiated graph and the reference to the pool it replays into. Movable, not copyable;
// destroying it (or Reset) destroys the executable graph and releases the reference.
class Graph {
 public:
  Graph() = default;
  Graph(Graph&& other) noexcept;
  Graph& operator=(Graph&& other) noexcept;
  Graph(const Graph&) = delete;
  Graph& operator=(const Graph&) = delete;
  ~Graph();

  // Queues one replay on `stream` (a stream of the graph's device).
  absl::Status Launch(Stream stream);
  // Destroys the executable graph and releases the pool reference; a second call does nothing.
  absl::Status Reset();

  bool valid() const { return manager_ != nullptr; }
  PoolId pool() const { return pool_; }

 private:
  friend class Capture;
  Graph(GraphDevice* device, PoolManager* manager, GraphExecHandle exec, PoolId pool)
      : manager_(manager), device_(device), exec_(exec), pool_(pool) {}

  PoolManager* manager_ = nullptr;  // nullptr: empty, moved from or reset
  GraphDevice* device_ = nullptr;
  GraphExecHandle exec_ = nullptr;
  PoolId pool_;
};

// A capture underway on one stream. Movable, not copyable; destroying one that was not ended
// abandons it (see the file comment).
class Capture {
 public:
  // Begins capturing `stream` on `device` (the device `pools`' allocator drives; not the legacy
  // default stream). INVALID_ARGUMENT when `device` is not of the pools' ordinal.
  // NOT_FOUND / FAILED_PRECONDITION when options.pool names a pool that is not a graph pool held
  // by anything; the driver's error when the capture cannot begin. On error nothing is left
  // behind.
  static absl::StatusOr<Capture> Begin(GraphDevice* device, PoolManager* pools, Stream stream,
                                       const CaptureOptions& options = {});

  Capture(Capture&& other) noexcept;
  Capture& operator=(Capture&& other) noexcept;
  Capture(const Capture&) = delete;
  Capture& operator=(const Capture&) = delete;
  ~Capture();

  // Ends the capture and instantiates its graph. The capture is over whatever this returns: on
  // error (an invalidated capture, a failed instantiation) it was cleaned up as an abandoned one.
  // FAILED_PRECONDITION for a Capture that has already ended.
  absl::StatusOr<Graph> End();
  // Ends the capture and throws its graph away.
  absl::Status Abandon();

  bool active() const { return manager_ != nullptr; }
  PoolId pool() const { return pool_; }
  uint64_t capture_id() const { return capture_id_; }
  Stream stream() const { return stream_; }

 private:
  Capture(GraphDevice* device, PoolManager* manager, Stream stream, PoolId pool,
          uint64_t capture_id, uint64_t began_at)
      : manager_(manager),
        device_(device),
        stream_(stream),
        pool_(pool),
        capture_id_(capture_id),
        began_at_(began_at) {}
  // Stops the capture, its route and its mark; returns the graph the driver made, if any. The
  // pool reference is the caller's to keep or release.
  absl::StatusOr<GraphHandle> Finish();

  PoolManager* manager_ = nullptr;  // nullptr: ended or moved from
  GraphDevice* device_ = nullptr;
  Stream stream_ = nullptr;
  PoolId pool_;
  uint64_t capture_id_ = 0;
  // PoolManager::NextRouteSequence() before the capture's route: routes begun later are newer.
  uint64_t began_at_ = 0;
};

// A graph pool that exists before, between and after the graphs that share it (PyTorch's
// graph_pool_handle()). It holds one reference; pass id() as CaptureOptions::pool.
class SharedPool {
 public:
  static absl::StatusOr<SharedPool> Create(PoolManager* pools);

  SharedPool(SharedPool&& other) noexcept;
  SharedPool& operator=(SharedPool&& other) noexcept;
  SharedPool(const SharedPool&) = delete;
  SharedPool& operator=(const SharedPool&) = delete;
  ~SharedPool();

  PoolId id() const { return id_; }
  // Releases the reference now; a second call does nothing.
  absl::Status Reset();

 private:
  SharedPool(PoolManager* manager, PoolId id) : manager_(manager), id_(id) {}

  PoolManager* manager_ = nullptr;
  PoolId id_;
};

}  // namespace graph
}  // namespace tidepool

#endif  // TIDEPOOL_GRAPH_CAPTURE_H_
