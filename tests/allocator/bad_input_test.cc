// Tests of how the caching allocator refuses bad input. Callers make mistakes (a zero-byte
// request, a size computed with an overflow, freeing a pointer twice or one that never came from
// tidepool, using a block after freeing it), and an allocator that corrupts its books on such a
// call turns one bug into many unrelated ones. Each bad call must return the documented error
// (INVALID_ARGUMENT for a bad size or a foreign pointer, FAILED_PRECONDITION for a pointer inside
// tidepool's memory that is not a live block) and change nothing: the other live blocks still
// answer BlockSize with their sizes and can be freed, the statistics are exactly as before the
// call, and the device holds what it held. Every case runs with expandable segments on and off.
#include <catch2/catch.hpp>

#include <sys/resource.h>

#include <algorithm>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "allocator/stats.h"
#include "tests/testing/sim_harness.h"

namespace tidepool {
namespace {

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

// Everything a failed call must leave unchanged.
struct Observed {
  AllocatorStats stats;
  size_t used_bytes = 0;
  int64_t live_segments = 0;
};

void CheckSameStat(const Stat& before, const Stat& after, const char* name) {
  INFO(name);
  CHECK(after.current == before.current);
  CHECK(after.peak == before.peak);
  CHECK(after.added == before.added);
  CHECK(after.removed == before.removed);
}

class Fixture {
 public:
  explicit Fixture(bool expandable)
      : device_(testing::MakeDevice(size_t{8} << 30)),
        allocator_(testing::MakeAllocator(device_.get(), testing::ExpandableConfig(expandable))),
        stream_(testing::NewStream(device_.get())),
        other_(testing::NewStream(device_.get())) {
    // Live blocks of every size class on two streams, and a cached free block among them.
    for (size_t size : {size_t{512}, 100 * kKiB, kMiB, 3 * kMiB, 24 * kMiB}) {
      live_.push_back(AllocateOk(size, stream_));
      live_.push_back(AllocateOk(size + 1, other_));
    }
    void* cached = AllocateOk(64 * kKiB, stream_).first;
    freed_ = cached;
    REQUIRE(allocator_->Free(cached).ok());
  }

  ~Fixture() {
    // Clean teardown: the live blocks are still freeable, and nothing stays on the device.
    for (const auto& [ptr, size] : live_) CHECK(allocator_->Free(ptr).ok());
    CHECK(allocator_->EmptyCache().ok());
    CHECK(device_->used_bytes() == 0);
    CHECK(device_->live_segments() == 0);
  }

  std::pair<void*, size_t> AllocateOk(size_t bytes, Stream stream) {
    absl::StatusOr<void*> ptr = allocator_->Allocate(bytes, stream);
    REQUIRE(ptr.ok());
    absl::StatusOr<size_t> size = allocator_->BlockSize(*ptr);
    REQUIRE(size.ok());
    return {*ptr, *size};
  }

  Observed Observe() const {
    return Observed{allocator_->GetStats(), device_->used_bytes(), device_->live_segments()};
  }

  // After a refused call: the books, the device and every live block are as they were.
  void CheckUnchanged(const Observed& before) const {
    const Observed after = Observe();
    CheckSameStat(before.stats.requested_bytes, after.stats.requested_bytes, "requested_bytes");
    CheckSameStat(before.stats.allocated_bytes, after.stats.allocated_bytes, "allocated_bytes");
    CheckSameStat(before.stats.active_blocks, after.stats.active_blocks, "active_blocks");
    CheckSameStat(before.stats.reserved_bytes, after.stats.reserved_bytes, "reserved_bytes");
    CheckSameStat(before.stats.segments, after.stats.segments, "segments");
    CHECK(after.stats.device_allocations == before.stats.device_allocations);
    CHECK(after.stats.device_frees == before.stats.device_frees);
    CHECK(after.used_bytes == before.used_bytes);
    CHECK(after.live_segments == before.live_segments);
    for (const auto& [ptr, size] : live_) {
      absl::StatusOr<size_t> now = allocator_->BlockSize(ptr);
      REQUIRE(now.ok());
      CHECK(*now == size);
    }
  }

  // The allocator still serves and takes back memory normally.
  void CheckStillWorks() {
    for (size_t size : {size_t{4096}, 2 * kMiB, 16 * kMiB}) {
      std::pair<void*, size_t> block = AllocateOk(size, stream_);
      for (const auto& [ptr, other_size] : live_) {
        const uintptr_t a = reinterpret_cast<uintptr_t>(block.first);
        const uintptr_t b = reinterpret_cast<uintptr_t>(ptr);
        CHECK((a + block.second <= b || b + other_size <= a));
      }
      CHECK(allocator_->Free(block.first).ok());
    }
  }

  CachingAllocator& allocator() { return *allocator_; }
  SimulatedDevice& device() { return *device_; }
  Stream stream() const { return stream_; }
  Stream other() const { return other_; }
  void* freed() const { return freed_; }
  const std::vector<std::pair<void*, size_t>>& live() const { return live_; }

 private:
  std::unique_ptr<SimulatedDevice> device_;
  std::unique_ptr<CachingAllocator> allocator_;
  Stream stream_ = nullptr;
  Stream other_ = nullptr;
  void* freed_ = nullptr;
  std::vector<std::pair<void*, size_t>> live_;
};

TEST_CASE("a zero-byte request is INVALID_ARGUMENT") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Fixture f(expandable);
  const Observed before = f.Observe();
  absl::StatusOr<void*> zero = f.allocator().Allocate(0, f.stream());
  REQUIRE_FALSE(zero.ok());
  CHECK(absl::IsInvalidArgument(zero.status()));
  f.CheckUnchanged(before);
  f.CheckStillWorks();
}

TEST_CASE("a size that overflows when rounded is RESOURCE_EXHAUSTED, like any size no device has") {
  const bool expandable = GENERATE(true, false);
  // Rounding up to 512 bytes overflows for every size above SIZE_MAX - 511.
  const size_t size = GENERATE(SIZE_MAX, SIZE_MAX - 100, SIZE_MAX - 510);
  INFO("expandable_segments=" << expandable << " size=" << size);
  Fixture f(expandable);
  const Observed before = f.Observe();
  absl::StatusOr<void*> huge = f.allocator().Allocate(size, f.stream());
  REQUIRE_FALSE(huge.ok());
  CHECK(absl::IsResourceExhausted(huge.status()));
  f.CheckUnchanged(before);
  f.CheckStillWorks();
}

#if defined(__SANITIZE_ADDRESS__) || defined(__SANITIZE_THREAD__)
constexpr bool kSanitized = true;
#else
constexpr bool kSanitized = false;
#endif

// Caps this process's address space for a scope, so that an allocator that spends host memory in
// proportion to an absurd request fails fast with std::bad_alloc (a test failure) instead of
// taking the build machine's memory. Not under sanitizers, which reserve terabytes of shadow.
class HostMemoryCap {
 public:
  explicit HostMemoryCap(size_t bytes) {
    if (kSanitized || getrlimit(RLIMIT_AS, &saved_) != 0) return;
    rlimit capped = saved_;
    capped.rlim_cur = saved_.rlim_max == RLIM_INFINITY ? bytes : std::min<rlim_t>(bytes, saved_.rlim_max);
    active_ = setrlimit(RLIMIT_AS, &capped) == 0;
  }
  ~HostMemoryCap() {
    if (active_) setrlimit(RLIMIT_AS, &saved_);
  }
  HostMemoryCap(const HostMemoryCap&) = delete;
  HostMemoryCap& operator=(const HostMemoryCap&) = delete;

 private:
  rlimit saved_{};
  bool active_ = false;
};

TEST_CASE("a size no device can hold is refused and leaves the allocator usable") {
  // One code for every size too large, whether or not it overflows when rounded
  // (size_policy.h); and the refusal leaves no reservation, mapping or broken state behind.
  const bool expandable = GENERATE(true, false);
  const size_t size =
      GENERATE(size_t{1} << 40, size_t{1} << 50, size_t{1} << 56, (size_t{1} << 56) + 1,
               size_t{1} << 62, size_t{1} << 63, SIZE_MAX - 511, SIZE_MAX - 512);
  INFO("expandable_segments=" << expandable << " size=" << size);
  Fixture f(expandable);
  if (kSanitized && size > (size_t{1} << 44)) {
    // Without the host-memory cap, an allocator that books such a request in host memory would
    // take the machine down; the optimized build checks these sizes.
    WARN("size " << size << " checked only in builds without sanitizers");
    return;
  }
  for (int attempt = 0; attempt < 3; ++attempt) {
    INFO("attempt " << attempt);
    absl::StatusOr<void*> huge = [&] {
      HostMemoryCap cap(size_t{4} << 30);
      return f.allocator().Allocate(size, f.stream());
    }();
    REQUIRE_FALSE(huge.ok());
    INFO(huge.status().ToString());
    CHECK(absl::IsResourceExhausted(huge.status()));
  }
  const AllocatorStats stats = f.allocator().GetStats();
  CHECK(stats.reserved_bytes.current == static_cast<int64_t>(f.device().used_bytes()));
  f.CheckStillWorks();
  // A new stream (a new shard, so fresh growth) still works too.
  absl::StatusOr<Stream> fresh = f.device().CreateStream();
  REQUIRE(fresh.ok());
  for (size_t request : {size_t{4096}, 3 * kMiB, 40 * kMiB}) {
    absl::StatusOr<void*> ptr = f.allocator().Allocate(request, *fresh);
    INFO("request " << request << " on a fresh stream: " << ptr.status().ToString());
    REQUIRE(ptr.ok());
    CHECK(f.allocator().Free(*ptr).ok());
  }
}

TEST_CASE("freeing a pointer tidepool never handed out is INVALID_ARGUMENT") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Fixture f(expandable);
  int on_the_stack = 0;
  std::unique_ptr<char[]> on_the_heap(new char[1024]);
  const uintptr_t a_live_block = reinterpret_cast<uintptr_t>(f.live().front().first);
  void* const foreign[] = {
      &on_the_stack,
      on_the_heap.get(),
      reinterpret_cast<void*>(uintptr_t{1}),  // nullptr + 1
      reinterpret_cast<void*>(uintptr_t{512}),
      reinterpret_cast<void*>(UINTPTR_MAX - 511),
      reinterpret_cast<void*>(a_live_block - (size_t{1} << 40)),  // far below device memory
  };
  for (void* ptr : foreign) {
    INFO("pointer " << ptr);
    const Observed before = f.Observe();
    absl::Status freed = f.allocator().Free(ptr);
    CHECK(absl::IsInvalidArgument(freed));
    absl::StatusOr<size_t> size = f.allocator().BlockSize(ptr);
    CHECK(absl::IsInvalidArgument(size.status()));
    CHECK_FALSE(f.allocator().RecordStream(ptr, f.other()).ok());
    f.CheckUnchanged(before);
  }
  f.CheckStillWorks();
}

TEST_CASE("freeing a block twice is FAILED_PRECONDITION") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Fixture f(expandable);
  // The fixture's cached block was freed once already.
  const Observed before = f.Observe();
  absl::Status twice = f.allocator().Free(f.freed());
  CHECK(absl::IsFailedPrecondition(twice));
  f.CheckUnchanged(before);

  // The same for a block freed just now on the other stream, while other work is pending there.
  std::pair<void*, size_t> block = f.AllocateOk(5 * kMiB, f.other());
  f.device().Enqueue(f.other());
  REQUIRE(f.allocator().Free(block.first).ok());
  const Observed after_first = f.Observe();
  CHECK(absl::IsFailedPrecondition(f.allocator().Free(block.first)));
  CHECK(absl::IsFailedPrecondition(f.allocator().Free(block.first)));
  f.CheckUnchanged(after_first);

  // And for one freed while in use on another stream (its reuse awaits an event).
  std::pair<void*, size_t> shared = f.AllocateOk(8 * kKiB, f.stream());
  f.device().Enqueue(f.other());
  REQUIRE(f.allocator().RecordStream(shared.first, f.other()).ok());
  REQUIRE(f.allocator().Free(shared.first).ok());
  const Observed awaiting = f.Observe();
  CHECK(absl::IsFailedPrecondition(f.allocator().Free(shared.first)));
  f.CheckUnchanged(awaiting);
  f.CheckStillWorks();
}

TEST_CASE("freeing a pointer into the middle of a live block is FAILED_PRECONDITION") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Fixture f(expandable);
  for (const auto& [ptr, size] : f.live()) {
    if (size < 1024) continue;
    char* inside = static_cast<char*>(ptr) + 512;
    INFO("block " << ptr << " of " << size << ", pointer " << static_cast<void*>(inside));
    const Observed before = f.Observe();
    CHECK(absl::IsFailedPrecondition(f.allocator().Free(inside)));
    CHECK_FALSE(f.allocator().BlockSize(inside).ok());
    CHECK_FALSE(f.allocator().RecordStream(inside, f.other()).ok());
    f.CheckUnchanged(before);
  }
  f.CheckStillWorks();
}

TEST_CASE("a pointer whose memory went back to the device is refused, not reused") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Fixture f(expandable);
  std::pair<void*, size_t> block = f.AllocateOk(48 * kMiB, f.stream());
  REQUIRE(f.allocator().Free(block.first).ok());
  REQUIRE(f.allocator().EmptyCache().ok());
  const Observed before = f.Observe();
  absl::Status stale = f.allocator().Free(block.first);
  CHECK((absl::IsInvalidArgument(stale) || absl::IsFailedPrecondition(stale)));
  CHECK_FALSE(f.allocator().BlockSize(block.first).ok());
  CHECK_FALSE(f.allocator().RecordStream(block.first, f.other()).ok());
  f.CheckUnchanged(before);
  f.CheckStillWorks();
}

TEST_CASE("RecordStream on a freed block is an error and changes nothing") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Fixture f(expandable);
  const Observed before = f.Observe();
  const int64_t events_before = f.device().live_events();
  absl::Status recorded = f.allocator().RecordStream(f.freed(), f.other());
  CHECK_FALSE(recorded.ok());
  CHECK(absl::IsFailedPrecondition(recorded));
  f.CheckUnchanged(before);
  CHECK(f.device().live_events() == events_before);
  // The freed block was not marked as used elsewhere: it is reused on its stream at once.
  std::pair<void*, size_t> again = f.AllocateOk(64 * kKiB, f.stream());
  CHECK(again.first == f.freed());
  REQUIRE(f.allocator().Free(again.first).ok());
  f.CheckStillWorks();
}

TEST_CASE("a stream the device does not know is refused") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Fixture f(expandable);
  absl::StatusOr<Stream> doomed = f.device().CreateStream();
  REQUIRE(doomed.ok());
  REQUIRE(f.device().DestroyStream(*doomed).ok());
  Stream never_made = reinterpret_cast<Stream>(uintptr_t{0xbad0});
  for (Stream unknown : {*doomed, never_made}) {
    INFO("stream " << unknown);
    const Observed before = f.Observe();
    absl::StatusOr<void*> ptr = f.allocator().Allocate(4096, unknown);
    CHECK_FALSE(ptr.ok());
    CHECK_FALSE(f.allocator().RecordStream(f.live().front().first, unknown).ok());
    f.CheckUnchanged(before);
  }
  f.CheckStillWorks();
}

TEST_CASE("Create refuses a missing device") {
  absl::StatusOr<std::unique_ptr<CachingAllocator>> made =
      CachingAllocator::Create(nullptr, Config{});
  CHECK_FALSE(made.ok());
}

}  // namespace
}  // namespace tidepool
