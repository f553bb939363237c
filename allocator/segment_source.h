// Segment sources: where an arena's plain segments come from.
//
// The caching core carves segments into blocks; a segment source only hands out and takes back
// whole segments. The default is the device itself (cuMemAlloc on CUDA). Other sources let a pool
// get its memory elsewhere: user callbacks (the C API), NCCL's ncclMemAlloc for symmetric
// segments. Expandable segments are not a source: they map the device's physical chunks
// directly, and only arenas whose memory comes from the device grow that way.
//
// A source is called under the allocator's growth lock, never on the cached path, so it may be
// slow; it must be thread-compatible (the allocator never calls it concurrently).
#ifndef TIDEPOOL_ALLOCATOR_SEGMENT_SOURCE_H_
#define TIDEPOOL_ALLOCATOR_SEGMENT_SOURCE_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/device.h"

namespace tidepool {

class SegmentSource {
 public:
  virtual ~SegmentSource() = default;
  // `bytes` of device memory, or RESOURCE_EXHAUSTED when there is none (the allocator then
  // returns its cache and tries again).
  virtual absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) = 0;
  // Takes back a segment from AllocateSegment; no pending work uses it any more.
  virtual absl::Status FreeSegment(uintptr_t address, size_t bytes) = 0;
  // For messages: "device", "callbacks", "nccl window", ...
  virtual std::string name() const = 0;
};

// Plain segments straight from the device.
class DeviceSegments final : public SegmentSource {
 public:
  explicit DeviceSegments(Device* device) : device_(device) {}
  absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) override {
    return device_->AllocateSegment(bytes);
  }
  absl::Status FreeSegment(uintptr_t address, size_t bytes) override {
    return device_->FreeSegment(address, bytes);
  }
  std::string name() const override { return "device"; }

 private:
  Device* const device_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_SEGMENT_SOURCE_H_
