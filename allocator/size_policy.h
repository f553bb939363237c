// The size policy: how requests are rounded, which requests count as small, how big a new
// segment is, and when a free block is split.
//
// Small requests (up to 1 MiB) and large ones live in different segments, so that a long-lived
// small block never pins a large segment. The figures follow PyTorch's caching allocator, which
// they were tuned on; tidepool's own weapon against fragmentation is the expandable segment.
#ifndef TIDEPOOL_ALLOCATOR_SIZE_POLICY_H_
#define TIDEPOOL_ALLOCATOR_SIZE_POLICY_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"

namespace tidepool {

inline constexpr size_t kMinBlockSize = 512;             // alignment and rounding of blocks
inline constexpr size_t kSmallRequest = size_t{1} << 20;  // requests up to this are small
inline constexpr size_t kSmallSegment = size_t{2} << 20;  // plain segments for small requests
inline constexpr size_t kMediumSegment = size_t{20} << 20;  // for requests up to 10 MiB
inline constexpr size_t kMediumRequest = size_t{10} << 20;
inline constexpr size_t kLargeRounding = size_t{2} << 20;  // larger segments round to this
// The largest request looked at: far beyond any device, and safe from overflow when rounded.
inline constexpr size_t kMaxRequest = size_t{1} << 56;

// The most address space one expandable segment reserves (and the largest expandable_reserve_mb):
// the host keeps a page-map entry per 2 MiB and a chunk-table entry per granule of it, so an
// absurd device size must not turn into gigabytes of host memory. Far above any GPU's memory.
inline constexpr size_t kMaxExpandableReserve = size_t{1} << 40;

// The one rounding formula: `bytes` up (or down) to a multiple of `to` (any positive size; the
// callers' are powers of two, but nothing here needs that). RoundUp of values near SIZE_MAX
// overflows: requests are checked against kMaxRequest first.
constexpr size_t RoundUp(size_t bytes, size_t to) { return (bytes + to - 1) / to * to; }
constexpr size_t RoundDown(size_t bytes, size_t to) { return bytes / to * to; }

// Rounds a request to its block size, or explains why it cannot be served. Every size larger
// than a device can hold is RESOURCE_EXHAUSTED, however large (as cudaMalloc answers); only 0 is
// INVALID_ARGUMENT.
inline absl::StatusOr<size_t> RoundRequest(size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("tidepool: allocation of 0 bytes");
  if (bytes > kMaxRequest) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "tidepool: allocation of %u bytes is larger than any device (limit %u)", bytes,
        kMaxRequest));
  }
  return RoundUp(bytes, kMinBlockSize);
}

inline bool IsSmall(size_t rounded) { return rounded <= kSmallRequest; }

// The size of a new plain segment for a rounded request. A segment for large requests that is at
// or above max_split_size is never split, so it is no larger than the request rounded to 2 MiB.
// Small segments are split whatever the limit (they serve small requests only).
inline size_t PlainSegmentSize(size_t rounded, size_t max_split_size) {
  const size_t exact = RoundUp(rounded, kLargeRounding);
  if (IsSmall(rounded)) return kSmallSegment;
  size_t size = rounded <= kMediumRequest ? kMediumSegment : exact;
  if (size >= max_split_size) size = exact;
  return size;
}

// Whether serving `rounded` from a free block of `block_size` should split off the remainder.
// In a plain segment a large block keeps a remainder of up to 1 MiB rather than leave a sliver
// that only small requests (which live elsewhere) could use. In an expandable segment every
// remainder is split off: it coalesces with its neighbours when they are freed, and growth can
// unmap the whole granules it holds.
inline bool ShouldSplit(size_t block_size, size_t rounded, bool expandable) {
  size_t remainder = block_size - rounded;
  return IsSmall(rounded) || expandable ? remainder >= kMinBlockSize
                                        : remainder > kSmallRequest;
}

// Whether a free block of `block_size` may serve `rounded` at all: blocks above max_split_size
// are kept for requests of their own class, so a small request cannot fragment them; but a block
// no larger than the request rounded to a whole segment granule is never too big for it.
inline bool MayServe(size_t block_size, size_t rounded, size_t max_split_size) {
  const size_t exact = RoundUp(rounded, kLargeRounding);
  if (block_size <= exact) return true;
  if (rounded < max_split_size) return block_size < max_split_size;
  return block_size <= rounded + kMediumSegment;
}

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_SIZE_POLICY_H_
