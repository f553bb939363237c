// A caching allocator that records every allocate and free to a trace file.
//
// A decorator in the RMM way (like rmm's logging_resource_adaptor): it owns a CachingAllocator,
// offers the same calls, forwards each one, and writes one trace row per allocate and per free, in
// the replay CSV format of trace.h. A workload recorded this way replays with `tidepool replay`
// under any other configuration, which is how fragmentation is compared.
//
// Row order is replay order, so it must never show a pointer handed out again before the row that
// freed it. A free's row is therefore written before the block goes back to the allocator, and an
// allocate's row after the block came out of it; the rows themselves are serialized by one lock.
//
// Columns: Thread is a small index the process gives each thread on its first recorded call
// (0, 1, ...), Time is microseconds since the recorder was created, Stream is the stream's unique id from the
// device (never its handle, which the driver reuses), and a free carries the size and stream of
// its allocation. A refused allocation is written as an `allocate failure` row.
//
// Thread safe, like the allocator it wraps. Recording serializes calls on one lock: it is a
// diagnostic mode, not the fast path.
#ifndef TIDEPOOL_ALLOCATOR_RECORDING_ALLOCATOR_H_
#define TIDEPOOL_ALLOCATOR_RECORDING_ALLOCATOR_H_

#include <chrono>
#include <cstddef>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/device.h"
#include "allocator/mutex.h"
#include "allocator/trace.h"

namespace tidepool {

class RecordingAllocator {
 public:
  // Wraps `allocator`, recording to a new trace file at `trace_path` (gzip-compressed when the
  // path ends in ".gz").
  static absl::StatusOr<std::unique_ptr<RecordingAllocator>> Create(
      std::unique_ptr<CachingAllocator> allocator, const std::string& trace_path);
  RecordingAllocator(std::unique_ptr<CachingAllocator> allocator,
                     std::unique_ptr<TraceWriter> writer);
  RecordingAllocator(const RecordingAllocator&) = delete;
  RecordingAllocator& operator=(const RecordingAllocator&) = delete;

  // As CachingAllocator::Allocate, plus a row. If the row cannot be written the block is given
  // back and the write error returned, so that a trace never silently misses an allocation.
  absl::StatusOr<void*> Allocate(size_t bytes, Stream stream);
  // As CachingAllocator::Free, plus a row. A pointer that is not a live block recorded here is
  // passed to the allocator for its error, and no row is written.
  absl::Status Free(void* ptr);
  // Forwarded unrecorded: the trace format has no row for cross-stream use.
  absl::Status RecordStream(void* ptr, Stream stream);
  absl::Status EmptyCache();

  // Writes buffered rows out, so that the trace can be read while recording continues.
  absl::Status Flush();

  CachingAllocator& allocator() { return *allocator_; }
  Device* device() const { return allocator_->device(); }
  const std::string& trace_path() const { return writer_->path(); }

 private:
  // What a free's row repeats from its allocation.
  struct LiveBlock {
    size_t requested_bytes = 0;
    StreamId stream_id = 0;
  };

  // Fills in the thread and time columns and appends the row.
  absl::Status WriteRow(TraceEvent event) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const std::unique_ptr<CachingAllocator> allocator_;
  const std::unique_ptr<TraceWriter> writer_;
  const std::chrono::steady_clock::time_point start_;
  Mutex mu_;
  absl::flat_hash_map<void*, LiveBlock> live_blocks_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_RECORDING_ALLOCATOR_H_
