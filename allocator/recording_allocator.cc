// Trace recording around a CachingAllocator (see recording_allocator.h for the row-order rule
// this file keeps).
#include "allocator/recording_allocator.h"

#include <atomic>
#include <cstdint>
#include <utility>

#include "absl/strings/str_cat.h"

namespace tidepool {
namespace {

// The calling thread's index in trace rows: small numbers in order of first use read better than
// pthread ids, and are all a replay needs.
uint64_t CallingThreadIndex() {
  static std::atomic<uint64_t> next_index{0};
  thread_local const uint64_t index = next_index.fetch_add(1, std::memory_order_relaxed);
  return index;
}

}  // namespace

absl::StatusOr<std::unique_ptr<RecordingAllocator>> RecordingAllocator::Create(
    std::unique_ptr<CachingAllocator> allocator, const std::string& trace_path) {
  if (allocator == nullptr) {
    return absl::InvalidArgumentError("RecordingAllocator needs an allocator to wrap");
  }
  absl::StatusOr<std::unique_ptr<TraceWriter>> writer = TraceWriter::Open(trace_path);
  if (!writer.ok()) return writer.status();
  return std::make_unique<RecordingAllocator>(std::move(allocator), *std::move(writer));
}

RecordingAllocator::RecordingAllocator(std::unique_ptr<CachingAllocator> allocator,
                                       std::unique_ptr<TraceWriter> writer)
    : allocator_(std::move(allocator)),
      writer_(std::move(writer)),
      start_(std::chrono::steady_clock::now()) {}

absl::Status RecordingAllocator::WriteRow(TraceEvent event) {
  event.thread = CallingThreadIndex();
  event.time_us = std::chrono::duration_cast<std::chrono::microseconds>(
                      std::chrono::steady_clock::now() - start_)
                      .count();
  return writer_->Append(event);
}

absl::StatusOr<void*> RecordingAllocator::Allocate(size_t bytes, Stream stream) {
  absl::StatusOr<void*> block = allocator_->Allocate(bytes, stream);
  absl::StatusOr<StreamId> stream_id = allocator_->StreamIdOf(stream);
  TraceEvent event;
  event.size = bytes;
  event.stream = stream_id.ok() ? *stream_id : 0;
  if (!block.ok()) {
    event.action = TraceAction::kAllocateFailure;
    MutexLock lock(&mu_);
    // The allocator's error is what the caller needs; a failed row would only hide it.
    WriteRow(event).IgnoreError();
    return block;
  }
  absl::Status recorded = stream_id.status();
  if (recorded.ok()) {
    event.action = TraceAction::kAllocate;
    event.pointer = reinterpret_cast<uintptr_t>(*block);
    MutexLock lock(&mu_);
    recorded = WriteRow(event);
    if (recorded.ok()) live_blocks_[*block] = LiveBlock{bytes, *stream_id};
  }
  if (!recorded.ok()) {
    allocator_->Free(*block).IgnoreError();
    return absl::Status(recorded.code(),
                        absl::StrCat("allocation not recorded, so not made: ", recorded.message()));
  }
  return block;
}

absl::Status RecordingAllocator::Free(void* ptr) {
  {
    MutexLock lock(&mu_);
    auto live = live_blocks_.find(ptr);
    if (live != live_blocks_.end()) {
      TraceEvent event;
      event.action = TraceAction::kFree;
      event.pointer = reinterpret_cast<uintptr_t>(ptr);
      event.size = live->second.requested_bytes;
      event.stream = live->second.stream_id;
      live_blocks_.erase(live);
      // The block is freed even when its row cannot be written: keeping it would leak it, and
      // the error below already says the trace is incomplete.
      absl::Status recorded = WriteRow(event);
      absl::Status freed = allocator_->Free(ptr);
      return freed.ok() ? recorded : freed;
    }
  }
  // Not a block recorded here: the allocator says what is wrong with it.
  return allocator_->Free(ptr);
}

absl::Status RecordingAllocator::RecordStream(void* ptr, Stream stream) {
  return allocator_->RecordStream(ptr, stream);
}

absl::Status RecordingAllocator::EmptyCache() { return allocator_->EmptyCache(); }

absl::Status RecordingAllocator::Flush() { return writer_->Flush(); }

}  // namespace tidepool
