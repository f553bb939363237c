// Tests of the allocator's statistics (allocator/stats.h, CachingAllocator::GetStats). The
// figures are summed from per-stream shards, so a shard that forgets a decrement, counts a block
// twice, or is left out of the sum makes every dashboard and every out-of-memory message lie.
// A shadow model replays random allocations and frees on three streams and keeps its own
// requested / allocated / active-block figures; after every step GetStats() must agree with
// it, reserved_bytes.current must equal the simulated device's used_bytes() (with plain and
// with expandable segments), every peak must be at least its current value and at least the
// highest value the model saw, and each Stat must satisfy current == added - removed.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <random>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "tests/testing/sim_harness.h"
#include "allocator/stats.h"

namespace tidepool {
namespace {

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

struct LiveBlock {
  void* ptr;
  size_t requested;
  size_t allocated;
};

struct Model {
  int64_t requested = 0;
  int64_t allocated = 0;
  int64_t active = 0;
  int64_t max_requested = 0;
  int64_t max_allocated = 0;
  int64_t max_active = 0;

  void Add(const LiveBlock& block) {
    requested += static_cast<int64_t>(block.requested);
    allocated += static_cast<int64_t>(block.allocated);
    active += 1;
    max_requested = std::max(max_requested, requested);
    max_allocated = std::max(max_allocated, allocated);
    max_active = std::max(max_active, active);
  }
  void Remove(const LiveBlock& block) {
    requested -= static_cast<int64_t>(block.requested);
    allocated -= static_cast<int64_t>(block.allocated);
    active -= 1;
  }
};

void CheckStatConsistent(const Stat& stat, const char* name) {
  INFO(name << ": current " << stat.current << " peak " << stat.peak << " added " << stat.added
            << " removed " << stat.removed);
  CHECK(stat.current == stat.added - stat.removed);
  CHECK(stat.peak >= stat.current);
  CHECK(stat.current >= 0);
}

void CheckAgainstModel(const CachingAllocator& allocator, const SimulatedDevice& device,
                       const Model& model) {
  const AllocatorStats stats = allocator.GetStats();
  CHECK(stats.requested_bytes.current == model.requested);
  CHECK(stats.allocated_bytes.current == model.allocated);
  CHECK(stats.active_blocks.current == model.active);
  CHECK(stats.reserved_bytes.current == static_cast<int64_t>(device.used_bytes()));
  CHECK(stats.allocated_bytes.current <= stats.reserved_bytes.current);
  CHECK(stats.requested_bytes.current <= stats.allocated_bytes.current);
  // A merged peak is an upper bound of the true peak, never below it.
  CHECK(stats.requested_bytes.peak >= model.max_requested);
  CHECK(stats.allocated_bytes.peak >= model.max_allocated);
  CHECK(stats.active_blocks.peak >= model.max_active);
  CheckStatConsistent(stats.requested_bytes, "requested_bytes");
  CheckStatConsistent(stats.allocated_bytes, "allocated_bytes");
  CheckStatConsistent(stats.active_blocks, "active_blocks");
  CheckStatConsistent(stats.reserved_bytes, "reserved_bytes");
  CheckStatConsistent(stats.segments, "segments");
  CHECK(stats.device_frees <= stats.device_allocations);
  if (stats.reserved_bytes.current > 0) CHECK(stats.segments.current > 0);
}

TEST_CASE("statistics agree with a shadow model through random traffic on three streams") {
  const bool expandable = GENERATE(true, false);
  const uint32_t seed = GENERATE(11u, 12u);
  INFO("expandable_segments=" << expandable << " seed=" << seed);

  SimulatedDevice::Options options;
  options.capacity = size_t{4} << 30;
  SimulatedDevice device(options);
  std::unique_ptr<CachingAllocator> made =
      testing::MakeAllocator(&device, testing::ExpandableConfig(expandable));
  CachingAllocator& allocator = *made;

  std::vector<Stream> streams;
  for (int i = 0; i < 3; ++i) streams.push_back(testing::NewStream(&device));

  std::mt19937_64 random(seed);
  std::vector<LiveBlock> live;
  Model model;
  CheckAgainstModel(allocator, device, model);  // all zero before anything happens

  for (int step = 0; step < 3000; ++step) {
    INFO("step " << step);
    const uint64_t dice = random() % 100;
    if (live.empty() || dice < 55) {
      // Sizes from 1 byte to 24 MiB, log-uniform, so all size classes are hit.
      const int bits = static_cast<int>(random() % 25);
      const size_t size = 1 + random() % (size_t{1} << bits);
      Stream stream = streams[random() % streams.size()];
      absl::StatusOr<void*> ptr = allocator.Allocate(size, stream);
      INFO("Allocate(" << size << "): " << ptr.status().ToString());
      REQUIRE(ptr.ok());
      absl::StatusOr<size_t> block_size = allocator.BlockSize(*ptr);
      REQUIRE(block_size.ok());
      LiveBlock block{*ptr, size, *block_size};
      live.push_back(block);
      model.Add(block);
    } else if (dice < 97) {
      const size_t index = random() % live.size();
      const LiveBlock block = live[index];
      live[index] = live.back();
      live.pop_back();
      REQUIRE(allocator.Free(block.ptr).ok());
      model.Remove(block);
    } else if (dice < 99) {
      // Work on a stream, completed sometimes: no effect on the figures.
      Stream stream = streams[random() % streams.size()];
      device.Enqueue(stream);
      if (random() % 2 == 0) device.Complete(stream);
    } else {
      REQUIRE(allocator.EmptyCache().ok());
    }
    CheckAgainstModel(allocator, device, model);
  }

  for (const LiveBlock& block : live) {
    REQUIRE(allocator.Free(block.ptr).ok());
    model.Remove(block);
  }
  live.clear();
  CheckAgainstModel(allocator, device, model);
  REQUIRE(allocator.EmptyCache().ok());
  const AllocatorStats final_stats = allocator.GetStats();
  CHECK(final_stats.requested_bytes.current == 0);
  CHECK(final_stats.allocated_bytes.current == 0);
  CHECK(final_stats.active_blocks.current == 0);
  CHECK(final_stats.reserved_bytes.current == 0);
  CHECK(final_stats.segments.current == 0);
  CHECK(final_stats.device_allocations > 0);
  CHECK(final_stats.device_frees > 0);
  CHECK(final_stats.retries == 0);  // 4 GiB is plenty: no out-of-memory path was taken
  CHECK(final_stats.ooms == 0);
  CHECK(device.used_bytes() == 0);
}

TEST_CASE("with a single stream every peak is exact") {
  // docs/stats.md: summing shards makes peaks upper bounds, but with one stream there is one
  // shard, so requested / allocated / active peaks equal the highest values the model saw.
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  SimulatedDevice device;
  std::unique_ptr<CachingAllocator> made =
      testing::MakeAllocator(&device, testing::ExpandableConfig(expandable));
  CachingAllocator& allocator = *made;
  absl::StatusOr<Stream> stream = device.CreateStream();
  REQUIRE(stream.ok());

  std::mt19937_64 random(99);
  std::vector<LiveBlock> live;
  Model model;
  size_t max_used = 0;
  for (int step = 0; step < 2000; ++step) {
    INFO("step " << step);
    if (live.empty() || random() % 100 < 55) {
      const size_t size = 1 + random() % (size_t{1} << (random() % 24));
      absl::StatusOr<void*> ptr = allocator.Allocate(size, *stream);
      REQUIRE(ptr.ok());
      LiveBlock block{*ptr, size, *allocator.BlockSize(*ptr)};
      live.push_back(block);
      model.Add(block);
    } else {
      const size_t index = random() % live.size();
      REQUIRE(allocator.Free(live[index].ptr).ok());
      model.Remove(live[index]);
      live[index] = live.back();
      live.pop_back();
    }
    max_used = std::max(max_used, device.used_bytes());
    const AllocatorStats stats = allocator.GetStats();
    CHECK(stats.requested_bytes.peak == model.max_requested);
    CHECK(stats.allocated_bytes.peak == model.max_allocated);
    CHECK(stats.active_blocks.peak == model.max_active);
    // Reserved memory can peak inside an operation, where the test cannot see it.
    CHECK(stats.reserved_bytes.peak >= static_cast<int64_t>(max_used));
  }
  for (const LiveBlock& block : live) REQUIRE(allocator.Free(block.ptr).ok());
  REQUIRE(allocator.EmptyCache().ok());
}

TEST_CASE("a cached free block counts as reserved, not allocated") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  SimulatedDevice device;
  std::unique_ptr<CachingAllocator> made =
      testing::MakeAllocator(&device, testing::ExpandableConfig(expandable));
  CachingAllocator& allocator = *made;

  absl::StatusOr<void*> ptr = allocator.Allocate(3 * kMiB + 100, nullptr);
  REQUIRE(ptr.ok());
  AllocatorStats live = allocator.GetStats();
  CHECK(live.requested_bytes.current == static_cast<int64_t>(3 * kMiB + 100));
  CHECK(live.allocated_bytes.current == static_cast<int64_t>(*allocator.BlockSize(*ptr)));
  CHECK(live.active_blocks.current == 1);
  CHECK(live.reserved_bytes.current >= live.allocated_bytes.current);
  CHECK(live.device_allocations >= 1);
  CHECK(live.segments.current >= 1);

  REQUIRE(allocator.Free(*ptr).ok());
  AllocatorStats cached = allocator.GetStats();
  CHECK(cached.requested_bytes.current == 0);
  CHECK(cached.allocated_bytes.current == 0);
  CHECK(cached.active_blocks.current == 0);
  CHECK(cached.reserved_bytes.current == live.reserved_bytes.current);
  CHECK(cached.requested_bytes.peak >= static_cast<int64_t>(3 * kMiB + 100));
  CHECK(cached.requested_bytes.removed == static_cast<int64_t>(3 * kMiB + 100));
  CHECK(cached.active_blocks.added == 1);
  CHECK(cached.device_frees == 0);

  REQUIRE(allocator.EmptyCache().ok());
  AllocatorStats emptied = allocator.GetStats();
  CHECK(emptied.reserved_bytes.current == 0);
  CHECK(emptied.reserved_bytes.peak >= live.reserved_bytes.current);
  CHECK(emptied.segments.current == 0);
  CHECK(emptied.device_frees >= 1);
  CHECK(emptied.device_frees == emptied.device_allocations);
  CHECK(device.used_bytes() == 0);
}

TEST_CASE("a block freed while used on another stream leaves the live figures at once") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  SimulatedDevice device;
  std::unique_ptr<CachingAllocator> made =
      testing::MakeAllocator(&device, testing::ExpandableConfig(expandable));
  CachingAllocator& allocator = *made;
  absl::StatusOr<Stream> a = device.CreateStream();
  absl::StatusOr<Stream> b = device.CreateStream();
  REQUIRE(a.ok());
  REQUIRE(b.ok());

  absl::StatusOr<void*> ptr = allocator.Allocate(64 * kKiB, *a);
  REQUIRE(ptr.ok());
  device.Enqueue(*b);
  REQUIRE(allocator.RecordStream(*ptr, *b).ok());
  REQUIRE(allocator.Free(*ptr).ok());
  // Still waiting for B, but no longer the caller's: not requested, not allocated, not active.
  AllocatorStats waiting = allocator.GetStats();
  CHECK(waiting.requested_bytes.current == 0);
  CHECK(waiting.allocated_bytes.current == 0);
  CHECK(waiting.active_blocks.current == 0);
  CHECK(waiting.reserved_bytes.current == static_cast<int64_t>(device.used_bytes()));
  device.Complete(*b);
  REQUIRE(allocator.EmptyCache().ok());
  CHECK(allocator.GetStats().reserved_bytes.current == 0);
}

}  // namespace
}  // namespace tidepool
