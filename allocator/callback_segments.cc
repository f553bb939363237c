// Segments from user callbacks: see callback_segments.h for the callbacks' contract.
#include "allocator/callback_segments.h"

#include "absl/strings/str_format.h"

namespace tidepool {
namespace {

// The alignment of every block tidepool hands out (caching_allocator.h), so a segment's first
// block is aligned only if the segment is.
constexpr uintptr_t kSegmentAlignment = 512;

}  // namespace

// Marks the calling thread as inside a callback for the scope's life.
class CallingBackScope {
 public:
  CallingBackScope() { ++CallbackSegments::callbacks_running_; }
  ~CallingBackScope() { --CallbackSegments::callbacks_running_; }
  CallingBackScope(const CallingBackScope&) = delete;
  CallingBackScope& operator=(const CallingBackScope&) = delete;
};

absl::StatusOr<uintptr_t> CallbackSegments::AllocateSegment(size_t bytes) {
  void* segment;
  {
    CallingBackScope scope;
    segment = allocate_(bytes, device_, context_);
  }
  if (segment == nullptr) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "tidepool: the pool's allocate callback returned NULL for %u bytes on device %d", bytes,
        device_));
  }
  const uintptr_t address = reinterpret_cast<uintptr_t>(segment);
  if (address % kSegmentAlignment != 0) {
    {
      CallingBackScope scope;
      free_(segment, bytes, device_, context_);
    }
    return absl::InternalError(absl::StrFormat(
        "tidepool: the pool's allocate callback returned %p for %u bytes on device %d, which is "
        "not %u-byte aligned; the segment was given back",
        segment, bytes, device_, kSegmentAlignment));
  }
  return address;
}

absl::Status CallbackSegments::FreeSegment(uintptr_t address, size_t bytes) {
  CallingBackScope scope;
  free_(reinterpret_cast<void*>(address), bytes, device_, context_);
  return absl::OkStatus();
}

}  // namespace tidepool
