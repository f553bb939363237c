// The page map: from any device address to the segment that holds it, without a lock.
//
// `Free(ptr)` must find the shard that owns ptr before it can take that shard's lock; a map
// guarded by one device-wide lock would make every free contend with every other. The page map
// is a three-level radix tree over 2 MiB pages of a 57-bit address space (tcmalloc's pagemap,
// for device addresses). Writers (segment creation and release) hold the allocator's growth
// lock; readers take no lock. A segment is at least one page long but need not be page
// aligned, so a page can hold the end of one segment and the start of the next: each leaf entry
// has two slots, and a lookup checks which one contains the address.
//
// Segments handed to the page map must stay readable for the life of the map (the allocator
// retires them instead of deleting them), because a reader may still hold one it just looked
// up.
#ifndef TIDEPOOL_ALLOCATOR_PAGE_MAP_H_
#define TIDEPOOL_ALLOCATOR_PAGE_MAP_H_

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/base/attributes.h"

namespace tidepool {

// Segment must offer `bool Contains(uintptr_t address) const`, stable while registered.
template <typename Segment>
class PageMap {
 public:
  static constexpr int kPageShift = 21;  // 2 MiB pages
  static constexpr int kLevelBits = 12;
  static constexpr int kAddressBits = kPageShift + 3 * kLevelBits;  // 57
  static constexpr size_t kFanout = size_t{1} << kLevelBits;

  PageMap() = default;
  ~PageMap() {
    for (auto& middle : root_) {
      Middle* m = middle.load(std::memory_order_relaxed);
      if (m == nullptr) continue;
      for (auto& leaf : m->leaves) delete leaf.load(std::memory_order_relaxed);
      delete m;
    }
  }
  PageMap(const PageMap&) = delete;
  PageMap& operator=(const PageMap&) = delete;

  // Whether [address, address + bytes) can be registered at all.
  static bool Covers(uintptr_t address, size_t bytes) {
    return bytes > 0 && address + bytes > address &&
           ((address + bytes - 1) >> kAddressBits) == 0;
  }

  // Records that `segment` holds [address, address + bytes). Caller holds the writers' lock and
  // has checked Covers().
  void Register(uintptr_t address, size_t bytes, Segment* segment) {
    ForEachPage(address, bytes, [segment](Entry& entry) {
      std::atomic<Segment*>& slot =
          entry.slots[0].load(std::memory_order_relaxed) == nullptr ? entry.slots[0]
                                                                    : entry.slots[1];
      slot.store(segment, std::memory_order_release);
    });
  }

  void Unregister(uintptr_t address, size_t bytes, Segment* segment) {
    ForEachPage(address, bytes, [segment](Entry& entry) {
      for (auto& slot : entry.slots) {
        if (slot.load(std::memory_order_relaxed) == segment) {
          slot.store(nullptr, std::memory_order_release);
        }
      }
    });
  }

  // The registered segment containing `address`, or nullptr. Lock-free.
  ABSL_ATTRIBUTE_ALWAYS_INLINE Segment* Lookup(uintptr_t address) const {
    if ((address >> kAddressBits) != 0) return nullptr;
    uintptr_t page = address >> kPageShift;
    const Middle* middle = root_[page >> (2 * kLevelBits)].load(std::memory_order_acquire);
    if (middle == nullptr) return nullptr;
    const Leaf* leaf =
        middle->leaves[(page >> kLevelBits) & (kFanout - 1)].load(std::memory_order_acquire);
    if (leaf == nullptr) return nullptr;
    const Entry& entry = leaf->entries[page & (kFanout - 1)];
    for (const auto& slot : entry.slots) {
      Segment* segment = slot.load(std::memory_order_acquire);
      if (segment != nullptr && segment->Contains(address)) return segment;
    }
    return nullptr;
  }

 private:
  struct Entry {
    std::atomic<Segment*> slots[2] = {};
  };
  struct Leaf {
    Entry entries[kFanout];
  };
  struct Middle {
    std::atomic<Leaf*> leaves[kFanout] = {};
  };

  template <typename Fn>
  void ForEachPage(uintptr_t address, size_t bytes, Fn fn) {
    uintptr_t first = address >> kPageShift;
    uintptr_t last = (address + bytes - 1) >> kPageShift;
    for (uintptr_t page = first; page <= last; ++page) {
      std::atomic<Middle*>& middle_slot = root_[page >> (2 * kLevelBits)];
      Middle* middle = middle_slot.load(std::memory_order_relaxed);
      if (middle == nullptr) {
        middle = new Middle;
        middle_slot.store(middle, std::memory_order_release);
      }
      std::atomic<Leaf*>& leaf_slot = middle->leaves[(page >> kLevelBits) & (kFanout - 1)];
      Leaf* leaf = leaf_slot.load(std::memory_order_relaxed);
      if (leaf == nullptr) {
        leaf = new Leaf;
        leaf_slot.store(leaf, std::memory_order_release);
      }
      fn(leaf->entries[page & (kFanout - 1)]);
    }
  }

  std::atomic<Middle*> root_[kFanout] = {};
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_PAGE_MAP_H_
