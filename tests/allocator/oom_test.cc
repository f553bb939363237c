// Tests of out-of-memory behaviour on a small simulated device (64 MiB). A caching allocator
// holds on to freed memory, so when the device says no it must first give its cache back and
// try again (a retry), and only then fail, with a RESOURCE_EXHAUSTED error that says how much
// was asked and how much is reserved, because that is what a user needs to act. After a
// failure, whether from real exhaustion or from a fault injected in the middle of growth, the
// allocator must be exactly as usable as before: live blocks intact, no device memory leaked
// (used_bytes() and live_segments() return to 0 once everything is freed and the cache
// emptied), and its reserved-bytes statistic still equal to what the device holds. Each case
// runs with plain segments, with expandable segments that grow only by taking new chunks, and
// with expandable segments that first reclaim free chunks elsewhere
// (release_free_chunks_on_growth).
#include <catch2/catch.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "tests/testing/sim_harness.h"

namespace tidepool {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kCapacity = 64 * kMiB;

enum class Growth { kPlain, kExpandable, kExpandableReclaiming };

const char* GrowthName(Growth growth) {
  switch (growth) {
    case Growth::kPlain:
      return "plain segments";
    case Growth::kExpandable:
      return "expandable, no reclaim on growth";
    case Growth::kExpandableReclaiming:
      return "expandable, reclaim on growth";
  }
  return "?";
}

Config GrowthConfig(Growth growth) {
  Config config;
  config.expandable_segments = growth != Growth::kPlain;
  config.release_free_chunks_on_growth = growth == Growth::kExpandableReclaiming;
  return config;
}

// The shared simulated-device harness on a kCapacity device, with checks of its own.
struct Harness : testing::SimHarness {
  explicit Harness(Growth growth) : SimHarness(GrowthConfig(growth), kCapacity) {}

  // A live block and the size it answers with now, for CheckIntact.
  std::pair<void*, size_t> Live(void* ptr) { return {ptr, SizeOf(ptr)}; }

  // Live blocks still answer with the size they had, and the books agree with the device.
  void CheckIntact(const std::vector<std::pair<void*, size_t>>& live) {
    for (const auto& [ptr, size] : live) {
      absl::StatusOr<size_t> now = allocator->BlockSize(ptr);
      REQUIRE(now.ok());
      CHECK(*now == size);
    }
    AllocatorStats stats = allocator->GetStats();
    CHECK(stats.reserved_bytes.current == static_cast<int64_t>(device->used_bytes()));
    CHECK(stats.active_blocks.current == static_cast<int64_t>(live.size()));
    CHECK(device->used_bytes() <= kCapacity);
  }

  void FreeAllAndRequireClean(std::vector<std::pair<void*, size_t>>& live) {
    for (const auto& entry : live) Free(entry.first);
    live.clear();
    RequireClean();
    AllocatorStats stats = allocator->GetStats();
    CHECK(stats.reserved_bytes.current == 0);
    CHECK(stats.allocated_bytes.current == 0);
    CHECK(stats.active_blocks.current == 0);
  }
};

bool Overlaps(const void* a, size_t a_size, const void* b, size_t b_size) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a);
  const uintptr_t b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + b_size && b0 < a0 + a_size;
}

// Whether `message` states `bytes`, as a plain number or in a human unit ("24.00 MiB", "24 MiB").
bool MentionsBytes(const std::string& message, size_t bytes) {
  std::vector<std::string> forms = {absl::StrCat(bytes)};
  const struct {
    size_t unit;
    const char* name;
  } units[] = {{size_t{1} << 30, "GiB"}, {kMiB, "MiB"}, {size_t{1} << 10, "KiB"}};
  for (const auto& unit : units) {
    const double value = static_cast<double>(bytes) / static_cast<double>(unit.unit);
    forms.push_back(absl::StrFormat("%.2f %s", value, unit.name));
    forms.push_back(absl::StrFormat("%.1f %s", value, unit.name));
    if (bytes % unit.unit == 0) forms.push_back(absl::StrCat(bytes / unit.unit, " ", unit.name));
    forms.push_back(absl::StrFormat("%.2f%s", value, unit.name));
  }
  for (const std::string& form : forms) {
    if (message.find(form) != std::string::npos) return true;
  }
  return false;
}

TEST_CASE("a request that needs the cache back gets it by returning cached memory") {
  const Growth growth =
      GENERATE(Growth::kPlain, Growth::kExpandable, Growth::kExpandableReclaiming);
  INFO(GrowthName(growth));
  Harness h(growth);

  // Fill 60 of the 64 MiB with five 12 MiB blocks, then free three of them (the cache keeps
  // them, so only 4 MiB of the device are free).
  std::vector<void*> blocks;
  for (int i = 0; i < 5; ++i) blocks.push_back(h.Allocate(12 * kMiB));
  REQUIRE(h.device->used_bytes() == 60 * kMiB);
  std::vector<std::pair<void*, size_t>> live = {h.Live(blocks[1]), h.Live(blocks[3])};
  h.Free(blocks[0]);
  h.Free(blocks[2]);
  h.Free(blocks[4]);
  REQUIRE(h.device->used_bytes() == 60 * kMiB);

  const AllocatorStats before = h.allocator->GetStats();
  // 30 MiB fits no cached block (each is 12 MiB and they are not adjacent) and not in the
  // 4 MiB the device has left: only cached memory can serve it.
  absl::StatusOr<void*> big = h.allocator->Allocate(30 * kMiB, h.stream);
  INFO(big.status().ToString());
  REQUIRE(big.ok());
  const AllocatorStats after = h.allocator->GetStats();
  for (const auto& [ptr, size] : live) CHECK_FALSE(Overlaps(*big, 30 * kMiB, ptr, size));
  CHECK(after.ooms == before.ooms);
  if (growth == Growth::kExpandableReclaiming) {
    // Growth may unmap the free chunks and map them again where they are needed, or retry.
    CHECK(h.device->used_bytes() <= 60 * kMiB);
  } else {
    // The only way is to give the cache back to the device and try again.
    CHECK(after.retries == before.retries + 1);
    CHECK(after.device_frees > before.device_frees);
  }
  live.push_back(h.Live(*big));
  h.CheckIntact(live);
  h.FreeAllAndRequireClean(live);
}

TEST_CASE("asking for more than the device can give is RESOURCE_EXHAUSTED with the figures") {
  const Growth growth =
      GENERATE(Growth::kPlain, Growth::kExpandable, Growth::kExpandableReclaiming);
  INFO(GrowthName(growth));
  Harness h(growth);
  std::vector<std::pair<void*, size_t>> live;
  live.push_back(h.Live(h.Allocate(12 * kMiB)));
  live.push_back(h.Live(h.Allocate(12 * kMiB)));
  const AllocatorStats before = h.allocator->GetStats();
  const size_t reserved = static_cast<size_t>(before.reserved_bytes.current);
  REQUIRE(reserved == 24 * kMiB);

  // An odd size, so that the figure in the message cannot be a coincidence.
  const size_t asked = 100 * kMiB + 12345;
  absl::StatusOr<void*> failed = h.allocator->Allocate(asked, h.stream);
  REQUIRE_FALSE(failed.ok());
  CHECK(absl::IsResourceExhausted(failed.status()));
  const std::string message(failed.status().message());
  INFO("message: " << message);
  CHECK(MentionsBytes(message, asked));
  CHECK(MentionsBytes(message, reserved));

  const AllocatorStats after = h.allocator->GetStats();
  CHECK(after.ooms == before.ooms + 1);
  CHECK(after.requested_bytes.current == before.requested_bytes.current);
  CHECK(after.allocated_bytes.current == before.allocated_bytes.current);
  h.CheckIntact(live);

  // Still works afterwards, up to what is really left.
  live.push_back(h.Live(h.Allocate(38 * kMiB)));
  h.CheckIntact(live);
  absl::StatusOr<void*> one_too_many = h.allocator->Allocate(4 * kMiB, h.stream);
  CHECK(absl::IsResourceExhausted(one_too_many.status()));
  h.CheckIntact(live);
  h.FreeAllAndRequireClean(live);

  // And once empty, the whole device is available again.
  live.push_back(h.Live(h.Allocate(64 * kMiB)));
  h.CheckIntact(live);
  h.FreeAllAndRequireClean(live);
}

TEST_CASE("small requests fail cleanly when the device is full too") {
  const Growth growth =
      GENERATE(Growth::kPlain, Growth::kExpandable, Growth::kExpandableReclaiming);
  INFO(GrowthName(growth));
  Harness h(growth);
  std::vector<std::pair<void*, size_t>> live;
  live.push_back(h.Live(h.Allocate(64 * kMiB)));
  absl::StatusOr<void*> small = h.allocator->Allocate(4096, h.stream);
  REQUIRE_FALSE(small.ok());
  CHECK(absl::IsResourceExhausted(small.status()));
  h.CheckIntact(live);
  h.Free(live[0].first);
  live.clear();
  // The large block is cached; a small request needs its memory back, and gets it.
  void* ptr = h.Allocate(4096);
  live.push_back(h.Live(ptr));
  h.CheckIntact(live);
  h.FreeAllAndRequireClean(live);
}

TEST_CASE("a fault injected at any point of a growth leaves no trace") {
  const Growth growth =
      GENERATE(Growth::kPlain, Growth::kExpandable, Growth::kExpandableReclaiming);
  // 20 MiB of growth takes one plain segment or ten 2 MiB chunks: fail each one in turn.
  const int64_t nth = GENERATE(range(1, 13));
  INFO(GrowthName(growth) << ", device allocation " << nth << " fails");
  Harness h(growth);

  std::vector<std::pair<void*, size_t>> live;
  live.push_back(h.Live(h.Allocate(6 * kMiB)));
  void* cached = h.Allocate(8 * kMiB);
  live.push_back(h.Live(h.Allocate(4 * kMiB)));
  h.Free(cached);  // cached memory the retry may give back
  h.CheckIntact(live);

  const AllocatorStats before = h.allocator->GetStats();
  h.device->FailNthAllocation(nth);
  absl::StatusOr<void*> grown = h.allocator->Allocate(20 * kMiB, h.stream);
  const AllocatorStats after = h.allocator->GetStats();
  if (grown.ok()) {
    for (const auto& [ptr, size] : live) CHECK_FALSE(Overlaps(*grown, 20 * kMiB, ptr, size));
    live.push_back(h.Live(*grown));
  } else {
    // One injected fault on a device with room to spare: a retry would have served it, so a
    // failure must at least be the honest kind.
    CHECK(absl::IsResourceExhausted(grown.status()));
    CHECK(after.ooms == before.ooms + 1);
  }
  h.CheckIntact(live);

  // Everything still works: more growth, and a clean teardown.
  live.push_back(h.Live(h.Allocate(10 * kMiB)));
  h.CheckIntact(live);
  h.FreeAllAndRequireClean(live);
}

TEST_CASE("while every device allocation fails, allocations fail and nothing is lost") {
  const Growth growth =
      GENERATE(Growth::kPlain, Growth::kExpandable, Growth::kExpandableReclaiming);
  INFO(GrowthName(growth));
  Harness h(growth);
  std::vector<std::pair<void*, size_t>> live;
  live.push_back(h.Live(h.Allocate(3 * kMiB)));
  live.push_back(h.Live(h.Allocate(2048)));
  const AllocatorStats before = h.allocator->GetStats();

  h.device->SetFailAllAllocations(true);
  // Sizes that no cached block can serve.
  for (size_t size : {size_t{40} * kMiB, size_t{24} * kMiB}) {
    INFO("request " << size);
    absl::StatusOr<void*> failed = h.allocator->Allocate(size, h.stream);
    REQUIRE_FALSE(failed.ok());
    CHECK(absl::IsResourceExhausted(failed.status()));
    h.CheckIntact(live);
  }
  const AllocatorStats during = h.allocator->GetStats();
  CHECK(during.ooms == before.ooms + 2);
  CHECK(during.requested_bytes.current == before.requested_bytes.current);
  // Cached memory already held still serves what fits in it.
  void* from_cache = h.Allocate(1024);
  live.push_back(h.Live(from_cache));
  h.CheckIntact(live);

  h.device->SetFailAllAllocations(false);
  live.push_back(h.Live(h.Allocate(40 * kMiB)));
  h.CheckIntact(live);
  h.FreeAllAndRequireClean(live);
}

TEST_CASE("out-of-memory recovery returns cache held by other streams too") {
  const Growth growth =
      GENERATE(Growth::kPlain, Growth::kExpandable, Growth::kExpandableReclaiming);
  INFO(GrowthName(growth));
  Harness h(growth);
  absl::StatusOr<Stream> other = h.device->CreateStream();
  REQUIRE(other.ok());
  // 48 MiB cached on another stream, with work still queued there.
  absl::StatusOr<void*> elsewhere = h.allocator->Allocate(48 * kMiB, *other);
  REQUIRE(elsewhere.ok());
  const uint64_t other_at_free = h.device->Enqueue(*other);
  REQUIRE(h.allocator->Free(*elsewhere).ok());
  REQUIRE(h.device->used_bytes() == 48 * kMiB);

  std::vector<std::pair<void*, size_t>> live;
  live.push_back(h.Live(h.Allocate(40 * kMiB)));
  // The other stream's memory was given back (or, when growth reclaims free chunks, unmapped
  // and mapped again here), and only after its work was done.
  CHECK(h.device->IsComplete(*other, other_at_free));
  if (growth != Growth::kExpandableReclaiming) CHECK(h.allocator->GetStats().retries >= 1);
  h.CheckIntact(live);
  h.FreeAllAndRequireClean(live);
}

TEST_CASE("a memory limit is a device that is full there: the cache goes back, then a clear error") {
  const Growth growth =
      GENERATE(Growth::kPlain, Growth::kExpandable, Growth::kExpandableReclaiming);
  INFO(GrowthName(growth));
  Harness h(growth);
  h.allocator->SetMemoryLimit(32 * kMiB);
  CHECK(h.allocator->memory_limit() == 32 * kMiB);
  void* kept = h.Allocate(12 * kMiB);
  void* cached = h.Allocate(12 * kMiB);
  h.Free(cached);  // 24 MiB reserved, 12 of them cached
  std::vector<std::pair<void*, size_t>> live = {h.Live(kept)};
  // 16 MiB more would pass the limit with the cache kept, but not once the cache is back.
  void* fits = h.Allocate(16 * kMiB);
  live.push_back(h.Live(fits));
  // Plain segments needed the cache back; expandable ones grew the freed range in place.
  if (growth == Growth::kPlain) CHECK(h.allocator->GetStats().retries >= 1);
  CHECK(h.device->used_bytes() <= 32 * kMiB);
  // 8 MiB more cannot fit under 32 MiB whatever is given back: the error names the limit.
  const AllocatorStats before = h.allocator->GetStats();
  absl::StatusOr<void*> refused = h.allocator->Allocate(8 * kMiB, h.stream);
  REQUIRE(absl::IsResourceExhausted(refused.status()));
  CHECK(refused.status().message().find("memory limit of 33554432 bytes") != std::string::npos);
  CHECK(h.allocator->GetStats().ooms == before.ooms + 1);
  CHECK(h.device->used_bytes() <= 32 * kMiB);
  h.CheckIntact(live);
  // Lifted, the same request succeeds: the device itself has room.
  h.allocator->SetMemoryLimit(SIZE_MAX);
  void* after = h.Allocate(8 * kMiB);
  live.push_back(h.Live(after));
  h.CheckIntact(live);
  h.FreeAllAndRequireClean(live);
}

}  // namespace
}  // namespace tidepool
