// Expandable segments on a real GPU: growth by mapping physical chunks into reserved address
// ranges, data that survives the remapping, and memory that really goes back to the device.
//
// The heap grows through many allocations of mixed sizes; then every other block is freed and a
// large block is allocated, which the allocator may build from chunks it unmaps out of the holes.
// A chunk unmapped while a live block still used part of it would lose that block's data (or fault),
// so every live block is read back after each step. Finally EmptyCache must drop reserved bytes to
// zero and the driver must see the memory as free again.
#include <cstdint>
#include <vector>

#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "catch2/catch.hpp"
#include "tests/gpu/gpu_test_util.h"

namespace tidepool {
namespace gpu_test {
namespace {

struct LiveBlock {
  void* ptr = nullptr;
  size_t bytes = 0;
  uint32_t pattern = 0;
};

void CheckAll(CudaDevice& device, const std::vector<LiveBlock>& blocks, Stream stream) {
  for (const LiveBlock& block : blocks) {
    INFO("block of " << block.bytes << " bytes at " << block.ptr);
    CHECK(CountMismatches(device, reinterpret_cast<uintptr_t>(block.ptr), block.bytes,
                          block.pattern, stream) == 0);
  }
}

TEST_CASE("expandable segments grow, keep data through remapping, and give memory back") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, /*expandable=*/true);
  CachingAllocator& heap = *allocator;
  Stream stream = RequireStream(*device);

  // Grow: 192 blocks, about 3.5 GiB, sizes that straddle the granularity in every way.
  const std::vector<size_t> sizes = {kMiB,      3 * kMiB + 512, 8 * kMiB,  17 * kMiB,
                                     64 * kKiB, 40 * kMiB,      2 * kMiB, 5 * kMiB + 4};
  std::vector<LiveBlock> blocks;
  for (int i = 0; i < 192; ++i) {
    const size_t bytes = sizes[i % sizes.size()];
    absl::StatusOr<void*> ptr = heap.Allocate(bytes, stream);
    INFO("allocation " << i << " of " << bytes << " bytes");
    TIDEPOOL_REQUIRE_OK(ptr);
    blocks.push_back(LiveBlock{*ptr, bytes, 0xe0000000u | static_cast<uint32_t>(i)});
  }
  for (const LiveBlock& block : blocks) {
    FillPattern(*device, reinterpret_cast<uintptr_t>(block.ptr), block.bytes, block.pattern,
                stream);
  }
  CheckAll(*device, blocks, stream);

  AllocatorStats grown = heap.GetStats();
  INFO("after growth: reserved " << grown.reserved_bytes.current << ", allocated "
                                 << grown.allocated_bytes.current << ", device allocations "
                                 << grown.device_allocations);
  CHECK(grown.device_allocations > 1);
  CHECK(grown.reserved_bytes.current >= grown.allocated_bytes.current);
  // Chunks are mapped where requests need them, so growth alone reserves little beyond what is
  // allocated.
  CHECK(grown.reserved_bytes.current <= grown.allocated_bytes.current + int64_t{64} * 1024 * 1024);

  // Free every other block and ask for one large block: the holes' whole chunks may be unmapped
  // and mapped again for it. The survivors must keep their data.
  std::vector<LiveBlock> survivors;
  for (size_t i = 0; i < blocks.size(); ++i) {
    if (i % 2 == 0) {
      TIDEPOOL_REQUIRE_OK(heap.Free(blocks[i].ptr));
    } else {
      survivors.push_back(blocks[i]);
    }
  }
  const size_t large_bytes = 512 * kMiB + 512;
  absl::StatusOr<void*> large = heap.Allocate(large_bytes, stream);
  TIDEPOOL_REQUIRE_OK(large);
  survivors.push_back(LiveBlock{*large, large_bytes, 0xe1a49e00u});
  FillPattern(*device, reinterpret_cast<uintptr_t>(*large), large_bytes, 0xe1a49e00u, stream);
  CheckAll(*device, survivors, stream);

  // Refill the holes: new blocks among old ones, all data intact.
  for (int i = 0; i < 96; ++i) {
    const size_t bytes = sizes[(i * 3) % sizes.size()];
    absl::StatusOr<void*> ptr = heap.Allocate(bytes, stream);
    TIDEPOOL_REQUIRE_OK(ptr);
    const uint32_t pattern = 0xe2000000u | static_cast<uint32_t>(i);
    FillPattern(*device, reinterpret_cast<uintptr_t>(*ptr), bytes, pattern, stream);
    survivors.push_back(LiveBlock{*ptr, bytes, pattern});
  }
  CheckAll(*device, survivors, stream);

  // Free everything and empty the cache: reserved drops to zero, and the driver sees it.
  for (const LiveBlock& block : survivors) TIDEPOOL_REQUIRE_OK(heap.Free(block.ptr));
  AllocatorStats all_free = heap.GetStats();
  CHECK(all_free.active_blocks.current == 0);
  CHECK(all_free.allocated_bytes.current == 0);
  const int64_t reserved_before = all_free.reserved_bytes.current;
  REQUIRE(reserved_before > 0);
  const size_t free_before = RequireFreeBytes(*device);

  TIDEPOOL_REQUIRE_OK(heap.EmptyCache());
  AllocatorStats emptied = heap.GetStats();
  const size_t free_after = RequireFreeBytes(*device);
  INFO("reserved " << reserved_before << " -> " << emptied.reserved_bytes.current
                   << "; device free " << free_before << " -> " << free_after);
  CHECK(emptied.reserved_bytes.current == 0);
  CHECK(emptied.device_frees > all_free.device_frees);
  // Other processes may allocate meanwhile; allow them 64 MiB.
  CHECK(free_after + 64 * kMiB >= free_before + static_cast<size_t>(reserved_before));

  // The emptied allocator grows again.
  absl::StatusOr<void*> again = heap.Allocate(40 * kMiB, stream);
  TIDEPOOL_REQUIRE_OK(again);
  FillPattern(*device, reinterpret_cast<uintptr_t>(*again), 40 * kMiB, 0xe3000000u, stream);
  CHECK(CountMismatches(*device, reinterpret_cast<uintptr_t>(*again), 40 * kMiB, 0xe3000000u,
                        stream) == 0);
  TIDEPOOL_REQUIRE_OK(heap.Free(*again));
  TIDEPOOL_REQUIRE_OK(heap.EmptyCache());
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
