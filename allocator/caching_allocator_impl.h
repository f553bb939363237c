// The caching allocator's machinery behind caching_allocator.h: the table of shards, the page
// map from addresses to segments, and everything that talks to the device about memory
// (growth, trimming, out-of-memory recovery).
//
// Growth has two forms. A plain segment is one device allocation sized by the size policy. An
// expandable segment is a large reserved address range per shard and size class, in which
// physical chunks of the device's granularity are mapped where a request needs them, next to the
// free block they extend. Before it takes new chunks from the device, growth first unmaps whole
// free chunks elsewhere in the shard and maps those again where they are needed (after
// synchronizing the shard's stream, since blocks freed in stream order may still be in use by
// queued work): reserved memory then follows live memory instead of the history of the heap.
#ifndef TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_IMPL_H_
#define TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_IMPL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/block.h"
#include "allocator/config.h"
#include "allocator/device.h"
#include "allocator/mutex.h"
#include "allocator/page_map.h"
#include "allocator/shard.h"
#include "allocator/stats.h"

namespace tidepool {

class CachingAllocatorImpl {
 public:
  CachingAllocatorImpl(Device* device, const Config& config, size_t total_memory);
  ~CachingAllocatorImpl();

  absl::StatusOr<void*> Allocate(size_t bytes, Stream stream);
  absl::Status Free(void* ptr);
  absl::Status RecordStream(void* ptr, Stream stream);
  absl::Status EmptyCache();
  absl::StatusOr<size_t> BlockSize(const void* ptr);
  AllocatorStats GetStats();
  std::string SnapshotJson();

  Device* device() const { return device_; }
  const Config& config() const { return config_; }

 private:
  // The shard of `stream`, made on first use. Hot: a per-thread cache answers most calls.
  absl::StatusOr<Shard*> ShardFor(Stream stream);
  // The shard and segment of a pointer tidepool handed out, with the shard's mutex to be taken
  // by the caller; an error naming the pointer if tidepool does not own it.
  absl::StatusOr<Segment*> SegmentOf(uintptr_t address, const char* operation) const;

  // Adds free memory for `rounded` bytes to the shard. Takes shard locks itself, one at a time.
  absl::Status Grow(Shard& shard, size_t rounded) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status GrowPlain(Shard& shard, size_t rounded) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status GrowExpandable(Shard& shard, size_t rounded)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Unmaps whole free granules of the shard's expandable segments (never in the free blocks next
  // to `keep`, the unmapped block about to be mapped, which growth extends) until
  // `handles` holds `wanted` physical chunks, appending theirs. Physical chunks are all alike,
  // so a chunk freed by one stream or size class can be mapped again for any other.
  absl::Status ReclaimFreeGranules(Shard& shard, size_t wanted, const Block* keep,
                                   bool* synchronized, std::vector<PhysicalHandle>* handles)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_, shard.mu);
  // The same over the growing shard, then every other shard, each locked alone.
  absl::Status ReclaimAcrossShards(Shard& shard, size_t wanted, const Block* keep,
                                   std::vector<PhysicalHandle>* handles)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Undoes a growth that failed after `mapped` of its chunks were mapped at `map_at` inside
  // unmapped block `target`: unmaps
  // them and releases every handle. Returns `cause`.
  absl::Status RejectGrowth(const Block* target, uintptr_t map_at, size_t mapped,
                            const std::vector<PhysicalHandle>& handles, absl::Status cause)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  // Returns every whole free segment and free mapped granule of every shard to the device.
  absl::Status ReleaseCached() ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  absl::Status ReleaseShardCache(Shard& shard, bool* synchronized)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_, shard.mu);
  // Waits for the whole device, once per `*synchronized` flag. Memory freed in stream order may
  // still be used by queued work, so it is synchronized before it is unmapped or freed. The
  // whole device, not the freeing stream: the caller may have destroyed that stream, and a
  // destroyed stream's handle can be neither touched (the driver reads freed memory: seen
  // crashing on the H200) nor trusted (it may name a newer stream). Only growth and trimming
  // come here, never a cached allocation.
  absl::Status SynchronizeOnce(bool* synchronized);
  Segment* NewSegment(Shard& shard, uintptr_t base, size_t size, bool expandable, bool small)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  void RetireSegment(Segment* segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  std::string OutOfMemoryMessage(size_t bytes, size_t rounded, const Shard& shard,
                                 const absl::Status& cause)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(growth_mu_);
  std::vector<Shard*> AllShards();

  Device* const device_;
  const Config config_;
  const size_t total_memory_;
  const size_t granularity_;
  // Identifies this allocator in per-thread caches (addresses of dead allocators are reused).
  const uint64_t serial_;

  PageMap<Segment> page_map_;  // written under growth_mu_, read without a lock

  // Serializes growth, trimming and out-of-memory recovery. Lock order: growth_mu_, then one
  // shard's mu (never two at once), then shards_mu_ (a leaf). Unmapped blocks and the
  // segments' chunk tables change only under growth_mu_, so growth may drop a shard's lock and
  // take it again without losing its place.
  Mutex growth_mu_;
  AllocatorStats device_stats_ ABSL_GUARDED_BY(growth_mu_);  // reserved, segments, counters
  std::vector<std::unique_ptr<Segment>> segments_ ABSL_GUARDED_BY(growth_mu_);  // incl. retired

  Mutex shards_mu_;
  absl::flat_hash_map<StreamId, std::unique_ptr<Shard>> shards_ ABSL_GUARDED_BY(shards_mu_);
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_CACHING_ALLOCATOR_IMPL_H_
