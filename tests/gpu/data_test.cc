// Blocks from the caching allocator hold data on a real GPU, and live blocks never overlap.
//
// Each block gets its own pattern, written by the device (cuMemsetD32Async) and read back to the
// host; all blocks are written before any is read, so a block that overlapped another would show
// the other's pattern. Sizes run from 512 B to 256 MiB, odd sizes included, with plain and with
// expandable segments, on a created stream and on the legacy default stream, and again after the
// blocks come back from the cache.
#include <algorithm>
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

// From one small-block size to the largest, with sizes that are not multiples of anything.
const std::vector<size_t>& Sizes() {
  static const auto* const sizes = new std::vector<size_t>{
      512,           513,       1000,          4 * kKiB,  64 * kKiB + 4, kMiB - 4, kMiB,
      kMiB + 512,    2 * kMiB,  3 * kMiB + 7,  10 * kMiB, 20 * kMiB + 1, 64 * kMiB,
      100 * kMiB + 3, 256 * kMiB};
  return *sizes;
}

struct LiveBlock {
  uintptr_t address = 0;
  size_t requested = 0;
  size_t block_size = 0;
  uint32_t pattern = 0;
};

// Allocates every size on `stream`, fills each with its own pattern, reads all back, and checks
// that no two blocks overlap. Returns the blocks, still live.
std::vector<LiveBlock> AllocateFillAndCheck(CachingAllocator& allocator, CudaDevice& device,
                                            Stream stream, uint32_t round) {
  std::vector<LiveBlock> blocks;
  for (size_t i = 0; i < Sizes().size(); ++i) {
    const size_t bytes = Sizes()[i];
    absl::StatusOr<void*> ptr = allocator.Allocate(bytes, stream);
    INFO("Allocate(" << bytes << ")");
    TIDEPOOL_REQUIRE_OK(ptr);
    const uintptr_t address = reinterpret_cast<uintptr_t>(*ptr);
    CHECK(address % 512 == 0);
    absl::StatusOr<size_t> block_size = allocator.BlockSize(*ptr);
    TIDEPOOL_REQUIRE_OK(block_size);
    CHECK(*block_size >= bytes);
    blocks.push_back(LiveBlock{address, bytes, *block_size,
                               0xda7a0000u | (round << 8) | static_cast<uint32_t>(i)});
  }

  for (const LiveBlock& block : blocks) {
    FillPattern(device, block.address, block.requested, block.pattern, stream);
  }
  for (const LiveBlock& block : blocks) {
    INFO("block of " << block.requested << " bytes at " << std::hex << block.address);
    CHECK(CountMismatches(device, block.address, block.requested, block.pattern, stream) == 0);
  }

  std::vector<LiveBlock> by_address = blocks;
  std::sort(by_address.begin(), by_address.end(),
            [](const LiveBlock& a, const LiveBlock& b) { return a.address < b.address; });
  for (size_t i = 1; i < by_address.size(); ++i) {
    INFO("blocks at " << std::hex << by_address[i - 1].address << " (+" << std::dec
                      << by_address[i - 1].block_size << ") and " << std::hex
                      << by_address[i].address);
    CHECK(by_address[i - 1].address + by_address[i - 1].block_size <= by_address[i].address);
  }
  return blocks;
}

void FreeAll(CachingAllocator& allocator, const std::vector<LiveBlock>& blocks) {
  for (const LiveBlock& block : blocks) {
    TIDEPOOL_REQUIRE_OK(allocator.Free(reinterpret_cast<void*>(block.address)));
  }
}

TEST_CASE("blocks of every size hold their data and do not overlap") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);

  SECTION("on a created stream, then again from the cache") {
    Stream stream = RequireStream(*device);
    std::vector<LiveBlock> first = AllocateFillAndCheck(*allocator, *device, stream, 1);
    FreeAll(*allocator, first);
    std::vector<LiveBlock> second = AllocateFillAndCheck(*allocator, *device, stream, 2);
    FreeAll(*allocator, second);
    TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
    TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
  }
  SECTION("on the legacy default stream") {
    std::vector<LiveBlock> blocks = AllocateFillAndCheck(*allocator, *device, nullptr, 3);
    FreeAll(*allocator, blocks);
    TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  }
  SECTION("on two streams at once") {
    Stream first_stream = RequireStream(*device);
    Stream second_stream = RequireStream(*device);
    std::vector<LiveBlock> first = AllocateFillAndCheck(*allocator, *device, first_stream, 4);
    std::vector<LiveBlock> second = AllocateFillAndCheck(*allocator, *device, second_stream, 5);
    // Blocks of one stream were checked against each other; now check across the streams.
    for (const LiveBlock& a : first) {
      for (const LiveBlock& b : second) {
        INFO(std::hex << a.address << " (+" << std::dec << a.block_size << ") vs " << std::hex
                      << b.address << " (+" << std::dec << b.block_size << ")");
        CHECK((a.address + a.block_size <= b.address || b.address + b.block_size <= a.address));
      }
    }
    for (const LiveBlock& block : first) {
      CHECK(CountMismatches(*device, block.address, block.requested, block.pattern,
                            first_stream) == 0);
    }
    FreeAll(*allocator, first);
    FreeAll(*allocator, second);
    TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
    TIDEPOOL_REQUIRE_OK(device->DestroyStream(first_stream));
    TIDEPOOL_REQUIRE_OK(device->DestroyStream(second_stream));
  }
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
