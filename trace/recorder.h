// Recording a program's allocations as a trace, at the runtime boundary.
//
// Every allocation of a process passes through its runtime (runtime/runtime.h), whichever way it
// came in: the C API, pool routing, graph capture, and the integrations built on the C ABI. The
// runtime hands each allocate and free to a TraceRecorder when one is attached (TIDEPOOL_TRACE,
// docs/configuration.md), which writes one row per call in the replay CSV format of trace.h. A
// workload recorded this way replays with `tidepool replay` under any other configuration, which
// is how fragmentation is compared on a user's own program.
//
// Row order is replay order, so it must never show a pointer handed out again before the row that
// freed it. The runtime therefore calls RecordFree before the block goes back to the allocator and
// RecordAllocate after the block came out of it; the rows themselves are serialized by one lock.
//
// Columns: Thread is a small index the process gives each thread on its first recorded call
// (0, 1, ...), Time is microseconds since the recorder was made, Stream is the stream's unique id
// (never its handle, which the driver reuses), and a free carries the size and stream of its
// allocation. A refused allocation is an `allocate failure` row. Rows of every device go to the
// one file (the format has no device column; pointers of different devices never coincide).
//
// Thread safe. Recording serializes calls on one lock: it is a diagnostic mode, not the fast path.
#ifndef TIDEPOOL_TRACE_RECORDER_H_
#define TIDEPOOL_TRACE_RECORDER_H_

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/mutex.h"
#include "trace/trace.h"

namespace tidepool {

class TraceRecorder {
 public:
  // Records to a new trace file at `path` (gzip-compressed when it ends in ".gz").
  static absl::StatusOr<std::unique_ptr<TraceRecorder>> Open(const std::string& path);
  explicit TraceRecorder(std::unique_ptr<TraceWriter> writer);
  TraceRecorder(const TraceRecorder&) = delete;
  TraceRecorder& operator=(const TraceRecorder&) = delete;

  // A block of `bytes` came out of the allocator for a stream known by `stream_id`. If the row
  // cannot be written, the caller gives the block back and returns this error, so that a trace
  // never silently misses an allocation.
  absl::Status RecordAllocate(const void* ptr, size_t bytes, uint64_t stream_id)
      ABSL_LOCKS_EXCLUDED(mu_);
  // An allocation of `bytes` was refused.
  void RecordAllocateFailure(size_t bytes, uint64_t stream_id) ABSL_LOCKS_EXCLUDED(mu_);
  // `ptr` is about to be freed. Writes the row if `ptr` is a block recorded here (anything else
  // goes to the allocator for its error, unrecorded) and forgets the block either way; an error
  // says the row could not be written (the block is still to be freed: keeping it would leak it).
  absl::Status RecordFree(const void* ptr) ABSL_LOCKS_EXCLUDED(mu_);

  // Writes buffered rows out, so that the trace can be read while recording continues.
  absl::Status Flush();
  const std::string& path() const { return writer_->path(); }

 private:
  // What a free's row repeats from its allocation.
  struct LiveBlock {
    size_t requested_bytes = 0;
    uint64_t stream_id = 0;
  };

  // Fills in the thread and time columns and appends the row.
  absl::Status WriteRow(TraceEvent event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::unique_ptr<TraceWriter> writer_;
  const std::chrono::steady_clock::time_point start_;
  Mutex mu_;
  absl::flat_hash_map<const void*, LiveBlock> live_blocks_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tidepool

#endif  // TIDEPOOL_TRACE_RECORDER_H_
