// Observation: statistics, the JSON snapshot of every segment and block, and the out-of-memory
// message. All of it is const: it reads under the same locks as everything else (growth lock,
// then one shard lock at a time) and changes nothing.
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator_impl.h"

namespace tidepool {
namespace {

std::string HumanBytes(size_t bytes) {
  if (bytes >= (size_t{1} << 30)) return absl::StrFormat("%.2f GiB", bytes / 1073741824.0);
  if (bytes >= (size_t{1} << 20)) return absl::StrFormat("%.2f MiB", bytes / 1048576.0);
  if (bytes >= (size_t{1} << 10)) return absl::StrFormat("%.2f KiB", bytes / 1024.0);
  return absl::StrFormat("%u B", bytes);
}

const char* StateName(BlockState state) {
  switch (state) {
    case BlockState::kFree:
      return "free";
    case BlockState::kAllocated:
      return "allocated";
    case BlockState::kAwaitingEvents:
      return "awaiting_events";
    case BlockState::kUnmapped:
      return "unmapped";
    case BlockState::kQuick:
      return "free_parked";
  }
  return "unknown";
}

}  // namespace

AllocatorStats CachingAllocatorImpl::GetStats(const Arena* only) const {
  MutexLock growth(&growth_mu_);
  AllocatorStats total;
  for (Arena* arena : Arenas()) {
    if (only != nullptr && arena != only) continue;
    total += DeviceStats(*arena);
    for (Shard* shard : arena->Shards()) {
      MutexLock lock(&shard->mu);
      total += shard->stats();
    }
  }
  return total;
}

std::string CachingAllocatorImpl::SnapshotJson(const Arena* only) const {
  MutexLock growth(&growth_mu_);
  std::string json = absl::StrFormat(R"({"device":%d,"granularity":%u,"segments":[)",
                                     device_->ordinal(), granularity_);
  bool first_segment = true;
  for (Arena* arena : Arenas()) {
    if (only != nullptr && arena != only) continue;
    for (Shard* shard : arena->Shards()) {
      MutexLock lock(&shard->mu);
      for (const Segment* segment : shard->segments()) {
        absl::StrAppendFormat(
            &json,
            R"(%s{"pool":"%s","address":%u,"size":%u,"stream":%u,"lane":%u,"expandable":%s,)"
            R"("small":%s,"blocks":[)",
            first_segment ? "" : ",", arena->label, segment->base, segment->size,
            shard->stream_id, shard->lane, segment->expandable ? "true" : "false",
            segment->small ? "true" : "false");
        first_segment = false;
        for (const Block* block = segment->first; block != nullptr; block = block->next) {
          absl::StrAppendFormat(&json,
                                R"(%s{"address":%u,"size":%u,"requested":%u,"state":"%s"})",
                                block == segment->first ? "" : ",", block->address, block->size,
                                block->requested, StateName(block->state));
        }
        json += "]}";
      }
    }
  }
  json += "]}";
  return json;
}

std::string CachingAllocatorImpl::OutOfMemoryMessage(size_t bytes, size_t rounded,
                                                     const Shard& shard,
                                                     const absl::Status& cause) const {
  size_t reserved = 0;
  size_t allocated = 0;
  std::string by_pool;
  for (Arena* arena : live_arenas_) {  // gone arenas hold no memory
    size_t arena_reserved = static_cast<size_t>(DeviceStats(*arena).reserved_bytes.current);
    size_t arena_allocated = 0;
    for (Shard* other : arena->Shards()) {
      MutexLock lock(&other->mu);
      arena_allocated += static_cast<size_t>(other->stats().allocated_bytes.current);
    }
    reserved += arena_reserved;
    allocated += arena_allocated;
    if (arena_reserved == 0) continue;
    absl::StrAppendFormat(&by_pool, "%s'%s' %u reserved (%s), %u in live blocks",
                          by_pool.empty() ? "" : "; ", arena->label, arena_reserved,
                          HumanBytes(arena_reserved), arena_allocated);
  }
  size_t cached = reserved > allocated ? reserved - allocated : 0;
  std::string device_free = "unknown";
  if (absl::StatusOr<MemoryInfo> info = device_->GetMemoryInfo(); info.ok()) {
    device_free = absl::StrCat(HumanBytes(info->free_bytes), " free of ",
                               HumanBytes(info->total_bytes));
  }
  return absl::StrFormat(
      "tidepool: out of memory on device %d: tried to allocate %s (%u bytes requested, %u "
      "rounded) in pool '%s' on stream %u. tidepool has %u bytes reserved (%s): %u bytes (%s) "
      "in live blocks and %u bytes (%s) cached but free, too fragmented for this request, "
      "awaiting events on other streams, or held by pools that keep their memory. By pool: %s. "
      "The device has %s.%s The device said: %s",
      device_->ordinal(), HumanBytes(bytes), bytes, rounded, shard.arena->label,
      shard.stream_id, reserved, HumanBytes(reserved), allocated, HumanBytes(allocated), cached,
      HumanBytes(cached), by_pool.empty() ? "none" : by_pool, device_free,
      captures_underway_.load() > 0
          ? " A CUDA graph capture is underway, so the cache was not given back to the device."
          : "",
      cause.message());
}

}  // namespace tidepool
