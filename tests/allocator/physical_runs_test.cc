// Tests of physical runs (docs/design.md): an expandable growth takes what it lacks from the
// device in runs of at most expandable_run_mb, each mapped at once; a run is unmapped, moved or
// given back only whole, so a live block keeps its whole run; a free run that fits moves to where
// growth needs it, and one larger than what is missing goes back to the device so that growth
// takes exactly what it lacks. The simulated device refuses an unmap that splits a mapping, as
// CUDA does, and says which mapping covers an address (MappingAt), which these tests read.
#include <catch2/catch.hpp>

#include <cstddef>
#include <cstdint>
#include <utility>

#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "tests/testing/sim_harness.h"

namespace tidepool {
namespace {

constexpr size_t kMiB = size_t{1} << 20;

Config RunConfig(size_t run_mb) {
  Config config;
  config.expandable_segments = true;
  config.expandable_run = run_mb * kMiB;
  return config;
}

std::pair<uintptr_t, size_t> Mapping(testing::SimHarness& h, void* ptr) {
  return h.device->MappingAt(reinterpret_cast<uintptr_t>(ptr));
}

TEST_CASE("a growth takes what it lacks in runs of at most expandable_run_mb") {
  const size_t run_mb = GENERATE(2, 16, 64);
  INFO("expandable_run_mb=" << run_mb);
  testing::SimHarness h(RunConfig(run_mb));
  void* block = h.Allocate(40 * kMiB);
  const int64_t runs = h.allocator->GetStats().device_allocations;
  // 40 MiB in runs of run_mb (whole granules): 20, 3 (16+16+8) or 1.
  CHECK(runs == static_cast<int64_t>((40 + run_mb - 1) / run_mb));
  // The first run starts at the block and is at most run_mb long.
  const auto [start, bytes] = Mapping(h, block);
  CHECK(start == reinterpret_cast<uintptr_t>(block));
  CHECK(bytes == std::min<size_t>(run_mb, 40) * kMiB);
  h.Free(block);
  h.RequireClean();
}

// An arena of its own on the harness's stream: its growth records the stream's fences in every
// arena (the allocation proves the handle alive), so the default arena's free runs are known idle.
Arena* OtherArena(testing::SimHarness& h) {
  ArenaOptions options;
  options.label = "other";
  absl::StatusOr<Arena*> arena = h.allocator->CreateArena(options);
  REQUIRE(arena.ok());
  return *arena;
}

void* AllocateIn(testing::SimHarness& h, Arena* arena, size_t bytes) {
  absl::StatusOr<void*> ptr = h.allocator->Allocate(arena, bytes, h.stream);
  INFO(ptr.status().ToString());
  REQUIRE(ptr.ok());
  return *ptr;
}

TEST_CASE("a live block keeps its whole run; the rest of the cache goes back") {
  testing::SimHarness h(RunConfig(16));
  // One 16 MiB run; a small large-class block is carved from it, the rest stays free.
  h.Free(h.Allocate(16 * kMiB));
  void* pin = h.Allocate(2 * kMiB + 512);
  const auto [pin_start, pin_bytes] = Mapping(h, pin);
  REQUIRE(pin_bytes == 16 * kMiB);
  REQUIRE(h.allocator->EmptyCache().ok());
  // The run under the live block stays mapped, whole, and nothing else is held.
  CHECK(Mapping(h, pin) == std::make_pair(pin_start, pin_bytes));
  CHECK(h.allocator->GetStats().reserved_bytes.current == static_cast<int64_t>(16 * kMiB));
  CHECK(h.device->used_bytes() == 16 * kMiB);
  h.Free(pin);
  h.RequireClean();
}

TEST_CASE("another arena's growth takes a free run that fits whole, or has a larger one go back") {
  // A free 16 MiB run; another arena on the same stream grows by 16 MiB (the run moves: nothing
  // new is taken) or by 4 MiB (the run cannot be split: it goes back to the device, and a 4 MiB
  // run is made, so reserved memory follows live memory).
  const size_t need_mb = GENERATE(16, 4);
  INFO("the other arena needs " << need_mb << " MiB");
  testing::SimHarness h(RunConfig(16));
  Arena* other = OtherArena(h);
  h.Free(h.Allocate(16 * kMiB));
  const int64_t allocations = h.allocator->GetStats().device_allocations;
  void* grown = AllocateIn(h, other, need_mb * kMiB);
  const bool moved = need_mb == 16;
  CHECK(h.allocator->GetStats().device_allocations == allocations + (moved ? 0 : 1));
  CHECK(h.allocator->GetStats().device_frees == (moved ? 0 : 1));
  CHECK(h.device->used_bytes() == need_mb * kMiB);
  CHECK(h.allocator->GetStats().reserved_bytes.current == static_cast<int64_t>(need_mb * kMiB));
  CHECK(Mapping(h, grown).second == need_mb * kMiB);
  h.Free(grown);
  h.RequireClean();
}

TEST_CASE("a run under a live block never moves to another growth") {
  testing::SimHarness h(RunConfig(16));
  Arena* other = OtherArena(h);
  h.Free(h.Allocate(16 * kMiB));
  void* pin = h.Allocate(2 * kMiB + 512);
  const auto before = Mapping(h, pin);
  REQUIRE(before.second == 16 * kMiB);
  // The other arena's growth cannot take any of the pinned run's free granules.
  void* elsewhere = AllocateIn(h, other, 12 * kMiB);
  CHECK(Mapping(h, pin) == before);
  CHECK(h.device->MappingAt(before.first + before.second - 1) == before);
  h.Free(elsewhere);
  h.Free(pin);
  h.RequireClean();
}

}  // namespace
}  // namespace tidepool
