// Trace recording at the runtime boundary (see recorder.h for the row-order rule this file
// keeps).
#include "trace/recorder.h"

#include <atomic>
#include <cstdint>
#include <utility>

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

absl::StatusOr<std::unique_ptr<TraceRecorder>> TraceRecorder::Open(const std::string& path) {
  absl::StatusOr<std::unique_ptr<TraceWriter>> writer = TraceWriter::Open(path);
  if (!writer.ok()) return writer.status();
  return std::make_unique<TraceRecorder>(*std::move(writer));
}

TraceRecorder::TraceRecorder(std::unique_ptr<TraceWriter> writer)
    : writer_(std::move(writer)), start_(std::chrono::steady_clock::now()) {}

absl::Status TraceRecorder::WriteRow(TraceEvent event) {
  event.thread = CallingThreadIndex();
  event.time_us = std::chrono::duration_cast<std::chrono::microseconds>(
                      std::chrono::steady_clock::now() - start_)
                      .count();
  return writer_->Append(event);
}

absl::Status TraceRecorder::RecordAllocate(const void* ptr, size_t bytes, uint64_t stream_id) {
  TraceEvent event;
  event.action = TraceAction::kAllocate;
  event.pointer = reinterpret_cast<uintptr_t>(ptr);
  event.size = bytes;
  event.stream = stream_id;
  MutexLock lock(&mu_);
  absl::Status written = WriteRow(event);
  if (written.ok()) live_blocks_[ptr] = LiveBlock{bytes, stream_id};
  return written;
}

void TraceRecorder::RecordAllocateFailure(size_t bytes, uint64_t stream_id) {
  TraceEvent event;
  event.action = TraceAction::kAllocateFailure;
  event.size = bytes;
  event.stream = stream_id;
  MutexLock lock(&mu_);
  // The allocator's error is what the caller needs; a failed row would only hide it.
  WriteRow(event).IgnoreError();
}

absl::Status TraceRecorder::RecordFree(const void* ptr) {
  MutexLock lock(&mu_);
  auto live = live_blocks_.find(ptr);
  if (live == live_blocks_.end()) return absl::OkStatus();
  TraceEvent event;
  event.action = TraceAction::kFree;
  event.pointer = reinterpret_cast<uintptr_t>(ptr);
  event.size = live->second.requested_bytes;
  event.stream = live->second.stream_id;
  live_blocks_.erase(live);
  return WriteRow(event);
}

absl::Status TraceRecorder::Flush() { return writer_->Flush(); }

}  // namespace tidepool
