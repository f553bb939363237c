// A segment source made of two user callbacks: the memory of a pool created with
// tidepool_create_callback_pool (tidepool.h).
//
// Some hosts already own the device memory and want tidepool to cache inside it: a runtime with
// its own arena, memory that must come from a special allocator (cuMemCreate with export
// handles, managed memory), or a test that hands out host memory. They give a pool two
// callbacks; tidepool calls them only for whole segments (under the allocator's growth lock,
// never on the cached path, never two at once), and carves the segments into blocks itself,
// as PyTorch does for `torch.cuda.MemPool(allocator=...)`.
//
// The callbacks' contract:
//   * allocate(bytes, device, context) returns `bytes` of memory usable by the device, at least
//     512-byte aligned, or NULL when it has none (tidepool then returns its cached free memory
//     and asks once more before reporting out of memory);
//   * free(ptr, bytes, device, context) takes back a segment with the size it was allocated
//     with, once no queued work uses it;
//   * both are called with the same `context`, which tidepool never reads.
// A misaligned segment is given back at once and the growth fails with INTERNAL.
#ifndef TIDEPOOL_ALLOCATOR_CALLBACK_SEGMENTS_H_
#define TIDEPOOL_ALLOCATOR_CALLBACK_SEGMENTS_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/segment_source.h"

namespace tidepool {

class CallingBackScope;

class CallbackSegments final : public SegmentSource {
 public:
  using AllocateFunction = void* (*)(size_t bytes, int device, void* context);
  using FreeFunction = void (*)(void* ptr, size_t bytes, int device, void* context);

  // Both functions must be non-null (the C API checks before making one).
  CallbackSegments(AllocateFunction allocate, FreeFunction free, void* context, int device)
      : allocate_(allocate), free_(free), context_(context), device_(device) {}

  absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) override;
  absl::Status FreeSegment(uintptr_t address, size_t bytes) override;

  // Whether the calling thread is inside one of the callbacks. The allocator calls them under
  // its device-wide growth lock, so a callback that called tidepool on the same device would
  // wait for that lock forever; the C API refuses every call made from inside a callback
  // instead (FAILED_PRECONDITION). A callback that hands the work to another thread and waits
  // for it cannot be told apart, and deadlocks: the contract forbids both.
  // Inline: the C API asks on every call (one thread-local read).
  static bool CallingBack() { return callbacks_running_ > 0; }
  std::string name() const override { return "callbacks"; }

 private:
  friend class CallingBackScope;
  // Callbacks running on this thread (trivial, so it is readable at thread exit too).
  static inline thread_local int callbacks_running_ = 0;

  const AllocateFunction allocate_;
  const FreeFunction free_;
  void* const context_;
  const int device_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_CALLBACK_SEGMENTS_H_
