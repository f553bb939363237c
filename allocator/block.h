// Blocks and segments: the caching core's picture of device memory.
//
// A segment is one range of device memory taken from the device: a plain segment (one device
// allocation) or an expandable segment (a large reserved address range in which physical chunks
// are mapped and unmapped on demand). A segment is carved into blocks that tile it exactly, kept
// in address order as a doubly linked list so that neighbours can be coalesced. Every segment
// belongs to one shard (one stream) for its whole life; its blocks are guarded by that shard's
// mutex.
#ifndef TIDEPOOL_ALLOCATOR_BLOCK_H_
#define TIDEPOOL_ALLOCATOR_BLOCK_H_

#include <cstddef>
#include <cstdint>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/container/inlined_vector.h"
#include "allocator/device.h"

namespace tidepool {

class Shard;
struct Segment;

enum class BlockState : uint8_t {
  kFree,            // cached, reusable on the shard's stream
  kAllocated,       // live: handed to a caller
  kAwaitingEvents,  // freed, but used on other streams whose events have not completed yet
  kUnmapped,        // address space of an expandable segment with no physical memory behind it
  kQuick,           // free, parked uncoalesced in the shard's quick list for its exact size
};

// Another stream a live block was used on (RecordStream).
struct StreamUse {
  Stream stream = nullptr;
  StreamId id = 0;
};

struct Block {
  uintptr_t address = 0;
  size_t size = 0;
  size_t requested = 0;  // what the caller asked for, while allocated
  Segment* segment = nullptr;
  Block* prev = nullptr;  // address-order neighbours inside the segment
  Block* next = nullptr;
  BlockState state = BlockState::kFree;
  // The allocator's free epoch when this memory was last freed (0: never used). Its memory may
  // go back to the device, or move, once its shard's fence recorded after that epoch has
  // completed, or a device synchronization has started after it (shard.h, the stream fence).
  uint64_t freed_epoch = 0;
  absl::InlinedVector<StreamUse, 1> uses;
};

// Best fit: smallest size first, then lowest address (so placement is deterministic).
struct BlockBySize {
  bool operator()(const Block* a, const Block* b) const {
    return a->size != b->size ? a->size < b->size : a->address < b->address;
  }
};
using BlockIndex = absl::btree_set<Block*, BlockBySize>;

struct Segment {
  uintptr_t base = 0;
  size_t size = 0;  // bytes of address space (an expandable segment's whole reservation)
  bool expandable = false;
  bool small = false;  // serves small requests only
  Shard* shard = nullptr;
  // False once returned to the device. Retired segments are kept, not deleted, because the
  // lock-free page map may still hand one to a racing reader (see page_map.h).
  bool live = true;
  Block* first = nullptr;
  // Expandable segments: the physical allocation mapped at each granule, 0 where unmapped. One
  // device allocation (a run) may span several granules, mapped at once, and its handle then
  // fills each of them (handles are unique, so a run is a maximal stretch of one handle). A run
  // is unmapped whole, never in part (cuMemUnmap cannot split a mapping), so only a run lying
  // wholly in free memory can go back to the device or move.
  std::vector<PhysicalHandle> chunks;

  bool Contains(uintptr_t address) const { return address - base < size; }

  // One run: `count` granules from granule index `first`.
  struct Run {
    size_t first;
    size_t count;
  };
  // The runs lying wholly inside the mapped range [begin, end) (granule-aligned addresses of this
  // segment), in address order; runs that reach outside it are left out. Those inside are
  // adjacent: runs tile the mapped granules.
  std::vector<Run> RunsInside(uintptr_t begin, uintptr_t end, size_t granularity) const {
    std::vector<Run> runs;
    const size_t last = (end - base) / granularity;
    size_t i = (begin - base) / granularity;
    // A run that began before `begin` is not wholly inside: skip to its end.
    while (i < last && i > 0 && chunks[i] != 0 && chunks[i - 1] == chunks[i]) ++i;
    while (i < last) {
      size_t next = i + 1;
      while (next < chunks.size() && chunks[next] == chunks[i]) ++next;
      if (chunks[i] != 0 && next <= last) runs.push_back(Run{i, next - i});
      i = next;
    }
    return runs;
  }
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_BLOCK_H_
