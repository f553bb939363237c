// PyTorch's pool hooks (begin / end / release allocate-to-pool) over tidepool's pool managers,
// with CUDA graph captures marked for the allocator.
//
// PyTorch calls the same three hooks for three things, and says which only through an opaque
// filter, a std::function<bool(cudaStream_t)>:
//   * a CUDA graph capture (torch.cuda.graph, make_graphed_callables): begin before
//     cudaStreamBeginCapture, with a filter that accepts the streams of that capture, whose id
//     it learns only after the hook returns; end after cudaStreamEndCapture; release when the
//     graph is reset;
//   * the calling thread (_cuda_beginAllocateCurrentThreadToPool, sglang's context) and every
//     stream (_cuda_beginAllocateToPool): filters that accept any stream of that thread, or any.
// Each begin becomes a routing entry whose filter is PyTorch's (RouteFilter::Accepting), so an
// allocation goes where PyTorch would send it, and nothing is evaluated while no entry exists.
//
// A capture is told from the others by asking the filter, at the begin, about a stream of
// tidepool's own that nothing ever captures: a capture's filter says no, the others say yes.
// A capture's begin marks the device as capturing for the allocator (NoteCaptureBegin: no
// event queries, no cache given back, deferred frees) and its pool keeps its free memory (a
// graph replays into it). The filter is wrapped to remember the streams it accepted.
//
// The mark must last exactly as long as the capture, and PyTorch's end does not say whether the
// capture is over: sglang ends a capture's routing in the middle of the capture and begins it
// again for its thread (docs/graphs.md rule 11). So at the end of a capture's entry, if a stream
// it accepted is still capturing, the mark is kept as an orphan of the pool; the next begin on
// that pool (sglang's) adopts it, and the end of that entry, once the capture is over, lifts it.
// With balanced capture behaviour (the default), that end also drops the reference sglang's
// begin took, which PyTorch would leak; with PyTorch's behaviour it is kept. A release that
// leaves a pool with no entries lifts any orphan mark left. A capture in which no allocation was
// routed before its entry was ended has no stream to ask: its mark is lifted at that end.
//
// Errors are returned; the hooks throw them into PyTorch (torch_hooks.cc).
//
// Thread safety: every method may be called from any thread. Lock order: mu_, then a pool
// manager's lock, then the allocator's; a wrapped filter takes only its own leaf lock.
#ifndef TIDEPOOL_INTEGRATIONS_TORCH_POOL_HOOKS_H_
#define TIDEPOOL_INTEGRATIONS_TORCH_POOL_HOOKS_H_

#include <functional>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/device.h"
#include "allocator/mutex.h"
#include "pool/pool_id.h"
#include "runtime/runtime.h"

namespace tidepool {
namespace torch_hooks {

class PoolHooks {
 public:
  using Filter = std::function<bool(Stream)>;

  // `runtime` must outlive the hooks.
  explicit PoolHooks(Runtime* runtime) : runtime_(runtime) {}
  PoolHooks(const PoolHooks&) = delete;
  PoolHooks& operator=(const PoolHooks&) = delete;

  absl::Status Begin(int device, PoolId pool, Filter filter) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status End(int device, PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);
  absl::Status Release(int device, PoolId pool) ABSL_LOCKS_EXCLUDED(mu_);
  // Balanced (true, the default) or PyTorch's bookkeeping for a capture's routing that a scope
  // ended and began again (see the file comment).
  void set_balanced(bool balanced) ABSL_LOCKS_EXCLUDED(mu_);
  // Capture marks the hooks hold on `device` (entries' and orphans'), for tests.
  int marks(int device) ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // The streams a capture's filter accepted.
  struct CaptureStreams {
    Mutex mu;
    std::vector<Stream> streams ABSL_GUARDED_BY(mu);
  };
  // One routing entry the hooks began, newest last: whether it holds a capture mark, whether it
  // resumed a capture's routing after a scope ended it, and the capture it belongs to.
  struct Entry {
    bool marked = false;
    bool resumed = false;
    std::shared_ptr<CaptureStreams> capture;
  };
  struct PoolState {
    std::vector<Entry> entries;
    // Marks of captures whose entry was ended while they still ran.
    std::vector<std::shared_ptr<CaptureStreams>> orphans;
  };
  using Key = std::pair<int, PoolId>;

  // A stream of tidepool's own on `device`, which nothing captures.
  absl::StatusOr<Stream> ProbeStream(int device) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether a stream `capture` accepted is capturing now.
  bool StillCapturing(GraphDevice& device, CaptureStreams& capture);
  // Lifts one capture mark of `device`.
  absl::Status Unmark(int device);

  Runtime* const runtime_;
  Mutex mu_;
  bool balanced_ ABSL_GUARDED_BY(mu_) = true;
  absl::flat_hash_map<Key, PoolState> pools_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<int, Stream> probes_ ABSL_GUARDED_BY(mu_);
};

}  // namespace torch_hooks
}  // namespace tidepool

#endif  // TIDEPOOL_INTEGRATIONS_TORCH_POOL_HOOKS_H_
