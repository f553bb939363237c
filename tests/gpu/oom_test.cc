// Running a real GPU out of memory through the caching allocator, and coming back.
//
// Big chunks (2 GiB) fill an H200's 141 GB in seconds. The allocator must report the failure as
// RESOURCE_EXHAUSTED near the device's capacity, with a message that says how much was asked and
// how much tidepool holds; then, with everything freed, it must serve a request that no cached
// segment fits (by returning its cache to the device and trying again), and EmptyCache must give
// the device all its memory back.
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "catch2/catch.hpp"
#include "tests/gpu/gpu_test_util.h"

namespace tidepool {
namespace gpu_test {
namespace {

TEST_CASE("out of memory is RESOURCE_EXHAUSTED near capacity, and the allocator recovers") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  CachingAllocator& heap = *allocator;
  Stream stream = RequireStream(*device);
  const size_t free_at_start = RequireFreeBytes(*device);
  const size_t chunk = 2 * kGiB;

  // Fill the device.
  std::vector<void*> chunks;
  absl::Status refused;
  const size_t most_chunks = free_at_start / chunk + 2;
  while (chunks.size() <= most_chunks) {
    absl::StatusOr<void*> ptr = heap.Allocate(chunk, stream);
    if (!ptr.ok()) {
      refused = ptr.status();
      break;
    }
    chunks.push_back(*ptr);
  }
  INFO(chunks.size() << " chunks of " << chunk << " bytes; device had " << free_at_start
                     << " bytes free; refusal: " << refused.ToString());
  REQUIRE_FALSE(refused.ok());
  REQUIRE(refused.code() == absl::StatusCode::kResourceExhausted);
  // Near capacity: what was served plus one more chunk covers nearly all that was free (the
  // driver keeps a little for itself).
  CHECK((chunks.size() + 1) * chunk + free_at_start / 20 >= free_at_start);

  // The message says what was asked and what tidepool holds.
  AllocatorStats at_refusal = heap.GetStats();
  CHECK(at_refusal.ooms >= 1);
  const std::string message(refused.message());
  CHECK(absl::StrContains(message, std::to_string(chunk)));
  CHECK(absl::StrContains(message, "reserved"));
  CHECK(absl::StrContains(message, std::to_string(at_refusal.reserved_bytes.current)));

  // The served chunks are real memory: spot-check the first and the last.
  for (void* ptr : {chunks.front(), chunks.back()}) {
    FillPattern(*device, reinterpret_cast<uintptr_t>(ptr), 64 * kMiB, 0x00f00001u, stream);
    CHECK(CountMismatches(*device, reinterpret_cast<uintptr_t>(ptr), 64 * kMiB, 0x00f00001u,
                          stream) == 0);
  }

  // Free everything. A request larger than any cached segment still succeeds: the allocator
  // gives its cache back to the device and grows again.
  for (void* ptr : chunks) TIDEPOOL_REQUIRE_OK(heap.Free(ptr));
  const size_t big = 3 * chunk;
  absl::StatusOr<void*> big_block = heap.Allocate(big, stream);
  TIDEPOOL_REQUIRE_OK(big_block);
  const uintptr_t big_address = reinterpret_cast<uintptr_t>(*big_block);
  FillPattern(*device, big_address, big, 0x00f00002u, stream);
  // Reading all 6 GiB back would take longer than the rest of the test; its ends will do.
  CHECK(CountMismatches(*device, big_address, 64 * kMiB, 0x00f00002u, stream) == 0);
  CHECK(CountMismatches(*device, big_address + big - 64 * kMiB, 64 * kMiB, 0x00f00002u,
                        stream) == 0);
  TIDEPOOL_REQUIRE_OK(heap.Free(*big_block));

  // And an ordinary request works again.
  absl::StatusOr<void*> ordinary = heap.Allocate(chunk, stream);
  TIDEPOOL_REQUIRE_OK(ordinary);
  TIDEPOOL_REQUIRE_OK(heap.Free(*ordinary));

  // EmptyCache gives it all back.
  TIDEPOOL_REQUIRE_OK(heap.EmptyCache());
  AllocatorStats emptied = heap.GetStats();
  CHECK(emptied.reserved_bytes.current == 0);
  const size_t free_at_end = RequireFreeBytes(*device);
  INFO("device free at start " << free_at_start << ", at end " << free_at_end);
  CHECK(free_at_end + 256 * kMiB >= free_at_start);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
