// Allocator statistics as small summable structs (the tcmalloc way): each shard of the allocator
// keeps its own, and a reader adds them up. docs/stats.md explains every field.
#ifndef TIDEPOOL_ALLOCATOR_STATS_H_
#define TIDEPOOL_ALLOCATOR_STATS_H_

#include <algorithm>
#include <cstdint>
#include <string>

namespace tidepool {

// One quantity: its current value, the highest it reached, and the running totals of what was
// added and removed (so `current == added - removed` always holds).
struct Stat {
  int64_t current = 0;
  int64_t peak = 0;
  int64_t added = 0;
  int64_t removed = 0;

  void Increase(int64_t amount) {
    current += amount;
    added += amount;
    peak = std::max(peak, current);
  }
  void Decrease(int64_t amount) {
    current -= amount;
    removed += amount;
  }
  // Summing shards: currents and totals add; the sum of peaks is an upper bound of the peak of
  // the sum (shards peak at different times), which is what a merged peak reports.
  Stat& operator+=(const Stat& other) {
    current += other.current;
    peak += other.peak;
    added += other.added;
    removed += other.removed;
    return *this;
  }
};

struct AllocatorStats {
  Stat requested_bytes;  // what callers asked for
  Stat allocated_bytes;  // what they were given (rounded sizes of live blocks)
  Stat active_blocks;    // live blocks
  Stat reserved_bytes;   // device memory held: segments and mapped chunks
  Stat segments;         // segments held (an expandable segment counts once)
  int64_t device_allocations = 0;  // segments or physical chunks taken from the device
  int64_t device_frees = 0;        // segments or physical chunks returned to the device
  int64_t retries = 0;             // growths that failed, freed the cache, and tried again
  int64_t ooms = 0;                // allocations that failed for want of memory

  AllocatorStats& operator+=(const AllocatorStats& other) {
    requested_bytes += other.requested_bytes;
    allocated_bytes += other.allocated_bytes;
    active_blocks += other.active_blocks;
    reserved_bytes += other.reserved_bytes;
    segments += other.segments;
    device_allocations += other.device_allocations;
    device_frees += other.device_frees;
    retries += other.retries;
    ooms += other.ooms;
    return *this;
  }

  std::string ToJson() const;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_STATS_H_
