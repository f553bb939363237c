// Tests of stream-ordered reuse, the contract at the top of allocator/caching_allocator.h.
// Reusing a block too early is silent memory corruption on a real GPU (a kernel still reading a
// buffer that now belongs to someone else), and reusing it too late, or synchronizing to be
// safe, is the slowness the allocator exists to avoid. So both directions are checked on the
// simulated device, whose per-stream clocks say exactly what work is still pending:
//   * a free followed by an allocation of the same size on the same stream gets the same
//     address back at once, with no event created and no synchronization;
//   * a block freed on stream A is never handed to stream B while A's work may be pending;
//   * after RecordStream(B) and Free, the block is not reused, even on A, until B's clock passes
//     the point it was at when the block was freed, and then it is, without blocking;
//   * memory goes back to the device only after the streams that may use it were synchronized,
//     including physical chunks that growth on one stream reclaims from another stream's cache
//     (checked at the moment of each Unmap through a device wrapper, also when another thread
//     frees a block in the middle of that growth);
//   * growth never synchronizes the device: it takes back what the streams' fences show idle,
//     waits for one stream's fence when the device is full, and only an out-of-memory
//     allocation's last retry synchronizes, for memory no fence covers.
// Every case runs with expandable segments on and off, except those about reclaiming chunks,
// which only expandable segments do.
#include <catch2/catch.hpp>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <future>
#include <memory>
#include <regex>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/forwarding_device.h"
#include "allocator/simulated_device.h"
#include "tests/testing/sim_harness.h"

namespace tidepool {
namespace {

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

// The shared simulated-device harness, without a stream of its own: each case makes its streams.
struct Harness : testing::SimHarness {
  explicit Harness(bool expandable)
      : SimHarness(testing::ExpandableConfig(expandable), testing::kGiB, {},
                   /*with_stream=*/false) {}
};

bool Overlaps(const void* a, size_t a_size, const void* b, size_t b_size) {
  const uintptr_t a0 = reinterpret_cast<uintptr_t>(a);
  const uintptr_t b0 = reinterpret_cast<uintptr_t>(b);
  return a0 < b0 + b_size && b0 < a0 + a_size;
}

// A small, a medium and a large request: each size class has its own pools.
const size_t kSizes[] = {4 * kKiB, 3 * kMiB, 12 * kMiB};

TEST_CASE("free then allocate on the same stream returns the block at once, without events") {
  const bool expandable = GENERATE(true, false);
  const size_t size = GENERATE(from_range(std::begin(kSizes), std::end(kSizes)));
  INFO("expandable_segments=" << expandable << " size=" << size);
  Harness h(expandable);
  Stream stream = h.NewStream();

  void* block = h.Allocate(size, stream);
  // Work using the block is queued and never completes during the test: stream order alone
  // makes the reuse safe.
  h.device->Enqueue(stream);
  const int64_t syncs_before = h.device->synchronizations();
  const int64_t events_before = h.device->live_events();
  for (int round = 0; round < 50; ++round) {
    INFO("round " << round);
    h.Free(block);
    void* again = h.Allocate(size, stream);
    REQUIRE(again == block);
    h.device->Enqueue(stream);
  }
  CHECK(h.device->synchronizations() == syncs_before);
  CHECK(h.device->live_events() == events_before);
  h.Free(block);
}

TEST_CASE("a block freed on stream A is not handed to stream B while A's work may be pending") {
  const bool expandable = GENERATE(true, false);
  const size_t size = GENERATE(from_range(std::begin(kSizes), std::end(kSizes)));
  INFO("expandable_segments=" << expandable << " size=" << size);
  Harness h(expandable);
  Stream a = h.NewStream();
  Stream b = h.NewStream();

  void* on_a = h.Allocate(size, a);
  const size_t a_size = h.SizeOf(on_a);
  h.device->Enqueue(a);  // pending work on A that may touch the block
  h.Free(on_a);

  std::vector<void*> on_b;
  for (int i = 0; i < 8; ++i) {
    void* ptr = h.Allocate(size, b);
    INFO("allocation " << i << " on B");
    CHECK_FALSE(Overlaps(ptr, h.SizeOf(ptr), on_a, a_size));
    on_b.push_back(ptr);
  }
  // Nor in pieces, to smaller requests.
  for (int i = 0; i < 8; ++i) {
    void* ptr = h.Allocate(size / 4, b);
    INFO("quarter-size allocation " << i << " on B");
    CHECK_FALSE(Overlaps(ptr, h.SizeOf(ptr), on_a, a_size));
    on_b.push_back(ptr);
  }
  for (void* ptr : on_b) h.Free(ptr);
}

TEST_CASE("after RecordStream the block waits for the other stream's clock, even on its own") {
  const bool expandable = GENERATE(true, false);
  const size_t size = GENERATE(from_range(std::begin(kSizes), std::end(kSizes)));
  INFO("expandable_segments=" << expandable << " size=" << size);
  Harness h(expandable);
  Stream a = h.NewStream();
  Stream b = h.NewStream();

  void* block = h.Allocate(size, a);
  const size_t block_size = h.SizeOf(block);
  h.device->Enqueue(b);
  const uint64_t b_at_free = h.device->Enqueue(b);  // B's work that uses the block
  REQUIRE(h.allocator->RecordStream(block, b).ok());
  h.Free(block);
  // Work queued on B after the free does not concern the block.
  const uint64_t b_after_free = h.device->Enqueue(b);

  std::vector<void*> interim;
  auto allocate_elsewhere = [&](const char* when) {
    void* ptr = h.Allocate(size, a);
    INFO(when);
    CHECK_FALSE(Overlaps(ptr, h.SizeOf(ptr), block, block_size));
    interim.push_back(ptr);
  };
  allocate_elsewhere("B has done nothing");
  h.device->Complete(b, b_at_free - 1);
  allocate_elsewhere("B is one short of the free");
  // A's own progress is irrelevant.
  h.device->Enqueue(a);
  h.device->Complete(a);
  allocate_elsewhere("A is idle, B is not");

  h.device->Complete(b, b_at_free);
  REQUIRE_FALSE(h.device->IsComplete(b, b_after_free));
  const int64_t syncs_before = h.device->synchronizations();
  void* reused = h.Allocate(size, a);
  CHECK(reused == block);
  // Waiting was done by watching the clock, never by blocking.
  CHECK(h.device->synchronizations() == syncs_before);

  h.Free(reused);
  for (void* ptr : interim) h.Free(ptr);
}

TEST_CASE("a block recorded on two streams waits for both") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(expandable);
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  Stream c = h.NewStream();
  const size_t size = 64 * kKiB;

  void* block = h.Allocate(size, a);
  const size_t block_size = h.SizeOf(block);
  const uint64_t b_at_free = h.device->Enqueue(b);
  const uint64_t c_at_free = h.device->Enqueue(c);
  REQUIRE(h.allocator->RecordStream(block, b).ok());
  REQUIRE(h.allocator->RecordStream(block, c).ok());
  REQUIRE(h.allocator->RecordStream(block, b).ok());  // twice is the same as once
  h.Free(block);

  std::vector<void*> interim;
  h.device->Complete(b, b_at_free);
  void* while_c_pending = h.Allocate(size, a);
  CHECK_FALSE(Overlaps(while_c_pending, h.SizeOf(while_c_pending), block, block_size));
  interim.push_back(while_c_pending);

  h.device->Complete(c, c_at_free);
  void* reused = h.Allocate(size, a);
  CHECK(reused == block);
  h.Free(reused);
  for (void* ptr : interim) h.Free(ptr);
}

TEST_CASE("a block waiting on one stream does not hold back a later one that is ready") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(expandable);
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  Stream c = h.NewStream();
  // Four quarter-MiB blocks fill the first 2 MiB small segment (or mapped granule) exactly, so
  // once the cache holds nothing else, a new request can only be served by a harvested block or
  // by growing.
  const size_t size = 512 * kKiB;
  void* first = h.Allocate(size, a);
  void* separator = h.Allocate(size, a);  // keeps the two freed blocks from coalescing
  void* second = h.Allocate(size, a);
  void* last = h.Allocate(size, a);
  const uintptr_t base = reinterpret_cast<uintptr_t>(first);
  REQUIRE(reinterpret_cast<uintptr_t>(separator) == base + size);
  REQUIRE(reinterpret_cast<uintptr_t>(second) == base + 2 * size);
  REQUIRE(reinterpret_cast<uintptr_t>(last) == base + 3 * size);

  h.device->Enqueue(b);
  const uint64_t c_at_free = h.device->Enqueue(c);
  REQUIRE(h.allocator->RecordStream(first, b).ok());
  REQUIRE(h.allocator->RecordStream(second, c).ok());
  h.Free(first);   // waits for B, which never finishes in this test
  h.Free(second);  // waits for C

  h.device->Complete(c, c_at_free);
  const size_t reserved_before = h.device->used_bytes();
  void* reused = h.Allocate(size, a);
  CHECK(reused == second);
  CHECK_FALSE(Overlaps(reused, h.SizeOf(reused), first, size));
  CHECK(h.device->used_bytes() == reserved_before);  // served from the cache, not by growing
  h.Free(reused);
  h.Free(separator);
  h.Free(last);
}

TEST_CASE("RecordStream on a stream whose work is already done does not delay reuse") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(expandable);
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  void* block = h.Allocate(8 * kKiB, a);
  h.device->Enqueue(b);
  h.device->Complete(b);
  REQUIRE(h.allocator->RecordStream(block, b).ok());
  const int64_t syncs_before = h.device->synchronizations();
  h.Free(block);
  CHECK(h.Allocate(8 * kKiB, a) == block);
  CHECK(h.device->synchronizations() == syncs_before);
  h.Free(block);
}

TEST_CASE("RecordStream on the block's own stream needs no event") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(expandable);
  Stream a = h.NewStream();
  void* block = h.Allocate(8 * kKiB, a);
  h.device->Enqueue(a);
  const int64_t events_before = h.device->live_events();
  REQUIRE(h.allocator->RecordStream(block, a).ok());
  h.Free(block);
  CHECK(h.Allocate(8 * kKiB, a) == block);
  CHECK(h.device->live_events() == events_before);
  h.Free(block);
}

TEST_CASE("FreeOnStream on another stream waits for it; on the block's own, reuse is at once") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(expandable);
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  // On its own stream: as Free, no event.
  void* own = h.Allocate(8 * kKiB, a);
  h.device->Enqueue(a);
  const int64_t events_before = h.device->live_events();
  REQUIRE(h.allocator->FreeOnStream(own, a).ok());
  CHECK(h.device->live_events() == events_before);
  CHECK(h.Allocate(8 * kKiB, a) == own);
  // On another: the block waits for that stream's work queued before the free, as after
  // RecordStream(b) and Free.
  const uint64_t b_at_free = h.device->Enqueue(b);
  REQUIRE(h.allocator->FreeOnStream(own, b).ok());
  void* meanwhile = h.Allocate(8 * kKiB, a);
  CHECK(meanwhile != own);
  h.device->Complete(b, b_at_free);
  CHECK(h.Allocate(8 * kKiB, a) == own);
  // Misuse changes nothing: a second free, a foreign pointer.
  h.Free(own);
  CHECK(absl::IsFailedPrecondition(h.allocator->FreeOnStream(own, a)));
  int foreign = 0;
  CHECK(absl::IsInvalidArgument(h.allocator->FreeOnStream(&foreign, a)));
  h.Free(meanwhile);
}

TEST_CASE("the default stream is a stream like any other") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(expandable);
  Stream b = h.NewStream();
  void* block = h.Allocate(16 * kKiB, nullptr);
  const size_t block_size = h.SizeOf(block);
  const uint64_t b_at_free = h.device->Enqueue(b);
  REQUIRE(h.allocator->RecordStream(block, b).ok());
  h.Free(block);
  void* interim = h.Allocate(16 * kKiB, nullptr);
  CHECK_FALSE(Overlaps(interim, h.SizeOf(interim), block, block_size));
  h.device->Complete(b, b_at_free);
  CHECK(h.Allocate(16 * kKiB, nullptr) == block);
  h.Free(block);
  h.Free(interim);
}

TEST_CASE("a block recorded on a stream that is destroyed before the free is still freed") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  Harness h(expandable);
  Stream a = h.NewStream();
  absl::StatusOr<Stream> doomed = h.device->CreateStream();
  REQUIRE(doomed.ok());
  void* block = h.Allocate(32 * kKiB, a);
  h.device->Enqueue(*doomed);
  REQUIRE(h.allocator->RecordStream(block, *doomed).ok());
  REQUIRE(h.device->DestroyStream(*doomed).ok());
  h.Free(block);
  // The destroyed stream can hold nothing back for ever: the block comes back.
  void* again = h.Allocate(32 * kKiB, a);
  CHECK(again == block);
  h.Free(again);
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device->used_bytes() == 0);
  CHECK(h.device->live_segments() == 0);
}

TEST_CASE("memory cached for a destroyed stream still goes back to the device") {
  const bool expandable = GENERATE(true, false);
  const size_t size = GENERATE(from_range(std::begin(kSizes), std::end(kSizes)));
  INFO("expandable_segments=" << expandable << " size=" << size);
  Harness h(expandable);
  Stream survivor = h.NewStream();
  absl::StatusOr<Stream> doomed = h.device->CreateStream();
  REQUIRE(doomed.ok());
  void* cached = h.Allocate(size, *doomed);
  const uint64_t survivor_work = h.device->Enqueue(survivor);
  h.device->Enqueue(*doomed);
  h.Free(cached);
  REQUIRE(h.device->DestroyStream(*doomed).ok());
  // A new stream gets a new id, so it must not inherit the dead stream's cache while that
  // cache might still be in use: its first allocation lands elsewhere.
  Stream newcomer = h.NewStream();
  void* fresh = h.Allocate(size, newcomer);
  CHECK_FALSE(Overlaps(fresh, h.SizeOf(fresh), cached, size));
  h.Free(fresh);
  // The dead stream's handle can no longer be synchronized; returning its memory needs the
  // whole device to be idle.
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device->used_bytes() == 0);
  CHECK(h.device->live_segments() == 0);
  CHECK(h.device->IsComplete(survivor, survivor_work));
}

TEST_CASE("memory goes back to the device only after its streams were synchronized") {
  const bool expandable = GENERATE(true, false);
  const size_t size = GENERATE(from_range(std::begin(kSizes), std::end(kSizes)));
  INFO("expandable_segments=" << expandable << " size=" << size);
  Harness h(expandable);
  Stream a = h.NewStream();
  Stream b = h.NewStream();

  void* plain = h.Allocate(size, a);
  void* shared = h.Allocate(size, a);
  const uint64_t a_at_free = h.device->Enqueue(a);
  const uint64_t b_at_free = h.device->Enqueue(b);
  REQUIRE(h.allocator->RecordStream(shared, b).ok());
  h.Free(plain);
  h.Free(shared);
  REQUIRE(h.device->used_bytes() > 0);

  REQUIRE(h.allocator->EmptyCache().ok());
  // Everything was free, so everything went back; and before it did, the work that might have
  // used it was waited for.
  CHECK(h.device->used_bytes() == 0);
  CHECK(h.device->live_segments() == 0);
  CHECK(h.device->IsComplete(a, a_at_free));
  CHECK(h.device->IsComplete(b, b_at_free));
}

// A Device that forwards to a SimulatedDevice, counts device synchronizations, and lets a test
// act at three moments: right after the allocator synchronized the device, right after it asked
// about or waited for an event (how growth learns that a stream's fence has passed), and right
// before it unmaps or gives back a range.
class InterceptingDevice : public ForwardingDevice {
 public:
  explicit InterceptingDevice(SimulatedDevice* inner) : ForwardingDevice(inner) {}

  std::function<void()> after_synchronize_device;
  std::function<void()> after_event_check;
  std::function<void(uintptr_t address, size_t bytes)> before_give_back;
  std::atomic<int64_t> device_synchronizations{0};

  absl::StatusOr<bool> QueryEvent(Event event) override {
    absl::StatusOr<bool> done = ForwardingDevice::QueryEvent(event);
    if (after_event_check) after_event_check();
    return done;
  }
  absl::Status SynchronizeEvent(Event event) override {
    absl::Status status = ForwardingDevice::SynchronizeEvent(event);
    if (after_event_check) after_event_check();
    return status;
  }

  absl::Status FreeSegment(uintptr_t address, size_t bytes) override {
    if (before_give_back) before_give_back(address, bytes);
    return ForwardingDevice::FreeSegment(address, bytes);
  }
  absl::Status Unmap(uintptr_t address, size_t bytes) override {
    if (before_give_back) before_give_back(address, bytes);
    return ForwardingDevice::Unmap(address, bytes);
  }
  absl::Status SynchronizeDevice() override {
    ++device_synchronizations;
    absl::Status status = ForwardingDevice::SynchronizeDevice();
    if (after_synchronize_device) after_synchronize_device();
    return status;
  }
};

struct ReclaimHarness {
  explicit ReclaimHarness(bool expandable = true, size_t capacity = size_t{1} << 30)
      : device(Options(capacity)), intercepting(&device) {
    Config config;
    config.expandable_segments = expandable;
    config.release_free_chunks_on_growth = true;
    allocator = testing::MakeAllocator(&intercepting, config);
    for (Stream* stream : {&t, &s, &u}) *stream = testing::NewStream(&device);
  }
  static SimulatedDevice::Options Options(size_t capacity) {
    SimulatedDevice::Options options;
    options.capacity = capacity;
    return options;
  }

  void* Allocate(size_t bytes, Stream stream) {
    absl::StatusOr<void*> ptr = allocator->Allocate(bytes, stream);
    INFO("Allocate(" << bytes << "): " << ptr.status().ToString());
    REQUIRE(ptr.ok());
    return *ptr;
  }

  // Records a violation if [address, +bytes) overlaps `watched` while `pending` work on `stream`
  // is not complete.
  void WatchGiveBacks(uintptr_t watched, size_t watched_size, Stream stream,
                      const uint64_t* pending) {
    intercepting.before_give_back = [=](uintptr_t address, size_t bytes) {
      ++give_backs;
      if (*pending == 0) return;
      if (address < watched + watched_size && watched < address + bytes &&
          !device.IsComplete(stream, *pending)) {
        violations.push_back(absl::StrCat("range [", address, ", +", bytes,
                                          ") given back while work queued at position ",
                                          *pending, " may still use it"));
      }
    };
  }

  SimulatedDevice device;
  InterceptingDevice intercepting;
  std::unique_ptr<CachingAllocator> allocator;
  Stream t = nullptr;  // the stream that grows
  Stream s = nullptr;  // the stream whose cache is reclaimed
  Stream u = nullptr;  // a third stream
  int64_t give_backs = 0;
  std::vector<std::string> violations;
};

TEST_CASE("growth that reclaims another stream's free chunks waits for that stream first") {
  ReclaimHarness h;
  // A 4 MiB block on S, freed with S's work that used it still queued: cached, pending.
  void* on_s = h.Allocate(4 * kMiB, h.s);
  const uint64_t s_work = h.device.Enqueue(h.s);
  h.WatchGiveBacks(reinterpret_cast<uintptr_t>(on_s), 4 * kMiB, h.s, &s_work);
  REQUIRE(h.allocator->Free(on_s).ok());

  // T grows by 8 MiB: it may take S's free chunks, but only once S's work is done.
  void* on_t = h.Allocate(8 * kMiB, h.t);
  INFO(absl::StrJoin(h.violations, "\n"));
  CHECK(h.violations.empty());
  REQUIRE(h.allocator->Free(on_t).ok());
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device.used_bytes() == 0);
  CHECK(h.violations.empty());
  CHECK(h.give_backs > 0);
}

TEST_CASE("growth does not reclaim a block still waiting for a RecordStream stream") {
  ReclaimHarness h;
  void* on_s = h.Allocate(4 * kMiB, h.s);
  const uint64_t u_work = h.device.Enqueue(h.u);
  REQUIRE(h.allocator->RecordStream(on_s, h.u).ok());
  h.WatchGiveBacks(reinterpret_cast<uintptr_t>(on_s), 4 * kMiB, h.u, &u_work);
  REQUIRE(h.allocator->Free(on_s).ok());

  void* on_t = h.Allocate(8 * kMiB, h.t);
  INFO(absl::StrJoin(h.violations, "\n"));
  CHECK(h.violations.empty());
  REQUIRE(h.allocator->Free(on_t).ok());
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device.used_bytes() == 0);
  CHECK(h.violations.empty());
}

TEST_CASE("a block freed on another stream during a reclaiming growth is not taken unwaited") {
  // The growth on T looks at T's fence first, then visits the other streams' caches one by one.
  // If another thread frees a block on S after that look (with S's work that used it still
  // queued), the growth must not unmap that block's chunks without waiting for S.
  ReclaimHarness h;
  // T's own cache: a free 2 MiB chunk away from where T will grow, so T's growth has something
  // to reclaim at home (and checks T's fence for it) before it looks at S.
  void* t_first = h.Allocate(2 * kMiB, h.t);
  void* t_second = h.Allocate(2 * kMiB, h.t);
  // S holds a live 4 MiB block, which "another thread" frees in the middle of T's growth.
  void* on_s = h.Allocate(4 * kMiB, h.s);
  REQUIRE(h.allocator->Free(t_first).ok());
  uint64_t s_work = 0;
  h.WatchGiveBacks(reinterpret_cast<uintptr_t>(on_s), 4 * kMiB, h.s, &s_work);
  bool freed_during_growth = false;
  h.intercepting.after_event_check = [&] {
    if (freed_during_growth) return;
    freed_during_growth = true;
    std::future<absl::Status> other_thread = std::async(std::launch::async, [&] {
      s_work = h.device.Enqueue(h.s);  // S's work that uses the block, queued before its free
      return h.allocator->Free(on_s);
    });
    if (other_thread.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
      std::fprintf(stderr, "Free on stream S blocked behind a growth on stream T\n");
      std::abort();
    }
    CHECK(other_thread.get().ok());
  };

  void* on_t = h.Allocate(8 * kMiB, h.t);
  h.intercepting.after_event_check = nullptr;
  INFO(absl::StrJoin(h.violations, "\n"));
  CHECK(h.violations.empty());
  // T's growth had T's free chunk to reclaim, so it checked T's fence (and the race was staged);
  // it never synchronized the device.
  CHECK(freed_during_growth);
  CHECK(h.intercepting.device_synchronizations == 0);
  const size_t violations_during_growth = h.violations.size();
  if (!freed_during_growth) {
    // The growth never checked an event: free the block now (nothing to race with).
    s_work = h.device.Enqueue(h.s);
    REQUIRE(h.allocator->Free(on_s).ok());
  }
  REQUIRE(h.allocator->Free(on_t).ok());
  REQUIRE(h.allocator->Free(t_second).ok());
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device.used_bytes() == 0);
  CHECK(h.device.live_segments() == 0);
  CHECK(h.violations.size() == violations_during_growth);  // none during the clean-up
}

TEST_CASE("growth leaves another stream's unfenced free chunks alone, and takes them once fenced") {
  ReclaimHarness h;
  void* on_s = h.Allocate(4 * kMiB, h.s);
  uint64_t s_work = h.device.Enqueue(h.s);
  h.WatchGiveBacks(reinterpret_cast<uintptr_t>(on_s), 4 * kMiB, h.s, &s_work);
  REQUIRE(h.allocator->Free(on_s).ok());

  // T grows while S's work is queued: the device has room, so T takes new chunks and leaves S's
  // free chunks (no fence covers them) alone, without synchronizing anything.
  const int64_t allocations_before = h.allocator->GetStats().device_allocations;
  void* first_t = h.Allocate(8 * kMiB, h.t);
  CHECK(h.allocator->GetStats().device_allocations == allocations_before + 1);  // one run
  CHECK(h.give_backs == 0);
  CHECK_FALSE(h.device.IsComplete(h.s, s_work));

  // The next allocation on S records S's fence; once S's work is done, T's next growth takes
  // S's free chunks back instead of new ones.
  void* small_s = h.Allocate(512, h.s);
  h.device.Complete(h.s);
  const int64_t allocations_then = h.allocator->GetStats().device_allocations;
  void* second_t = h.Allocate(4 * kMiB, h.t);
  CHECK(h.allocator->GetStats().device_allocations == allocations_then);
  CHECK(h.give_backs == 1);  // S's run of two granules, unmapped there to be mapped on T

  INFO(absl::StrJoin(h.violations, "\n"));
  CHECK(h.violations.empty());
  CHECK(h.intercepting.device_synchronizations == 0);
  for (void* ptr : {first_t, second_t, small_s}) REQUIRE(h.allocator->Free(ptr).ok());
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device.used_bytes() == 0);
}

TEST_CASE("a growth on a full device waits for the freed memory's stream, not the device") {
  ReclaimHarness h(/*expandable=*/true, 32 * kMiB);
  // U has work queued that touches none of tidepool's memory: a device synchronization would
  // wait for it, a wait for S's fence does not.
  const uint64_t u_work = h.device.Enqueue(h.u);
  void* on_s = h.Allocate(16 * kMiB, h.s);
  uint64_t s_work = h.device.Enqueue(h.s);
  h.WatchGiveBacks(reinterpret_cast<uintptr_t>(on_s), 16 * kMiB, h.s, &s_work);
  REQUIRE(h.allocator->Free(on_s).ok());
  // T grows while the device still has room: S's chunks are left alone, and S is asked for a
  // fence, which its next allocation records (after the free: the fence covers the block).
  void* first_t = h.Allocate(8 * kMiB, h.t);
  void* small_s = h.Allocate(512, h.s);
  CHECK_FALSE(h.device.IsComplete(h.s, s_work));

  // Now the device cannot supply T's growth: T waits for S's fence and maps S's chunks.
  void* second_t = h.Allocate(16 * kMiB, h.t);
  INFO(absl::StrJoin(h.violations, "\n"));
  CHECK(h.violations.empty());
  CHECK(h.device.IsComplete(h.s, s_work));
  CHECK_FALSE(h.device.IsComplete(h.u, u_work));
  CHECK(h.intercepting.device_synchronizations == 0);
  CHECK(h.allocator->GetStats().retries == 0);
  CHECK(h.allocator->GetStats().ooms == 0);
  for (void* ptr : {first_t, second_t, small_s}) REQUIRE(h.allocator->Free(ptr).ok());
}

TEST_CASE("an out-of-memory allocation's last retry synchronizes for memory no fence covers") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  ReclaimHarness h(expandable, 48 * kMiB);
  // S frees most of the device with its work still queued, and allocates nothing afterwards: no
  // fence covers the free memory, and S's handle may not be touched.
  void* on_s = h.Allocate(40 * kMiB, h.s);
  uint64_t s_work = h.device.Enqueue(h.s);
  h.WatchGiveBacks(reinterpret_cast<uintptr_t>(on_s), 40 * kMiB, h.s, &s_work);
  REQUIRE(h.allocator->Free(on_s).ok());
  void* on_t = h.Allocate(40 * kMiB, h.t);
  INFO(absl::StrJoin(h.violations, "\n"));
  CHECK(h.violations.empty());
  CHECK(h.device.IsComplete(h.s, s_work));
  CHECK(h.intercepting.device_synchronizations == 1);
  CHECK(h.allocator->GetStats().ooms == 0);
  REQUIRE(h.allocator->Free(on_t).ok());
}

TEST_CASE("EmptyCache does not give back a block freed on another stream after it synchronized") {
  // EmptyCache synchronizes once and then visits each stream's cache in turn. A block freed on
  // a later stream in between (by another thread, with that stream's work still queued) must not
  // go back to the device without waiting for that work.
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  ReclaimHarness h(expandable);
  // T (visited first) has a whole free segment or chunk to give back; S has a live block.
  void* on_t = h.Allocate(12 * kMiB, h.t);
  void* on_s = h.Allocate(12 * kMiB, h.s);
  REQUIRE(h.allocator->Free(on_t).ok());
  uint64_t s_work = 0;
  h.WatchGiveBacks(reinterpret_cast<uintptr_t>(on_s), 12 * kMiB, h.s, &s_work);
  bool freed_during_empty = false;
  h.intercepting.after_synchronize_device = [&] {
    if (freed_during_empty) return;
    freed_during_empty = true;
    std::future<absl::Status> other_thread = std::async(std::launch::async, [&] {
      s_work = h.device.Enqueue(h.s);
      return h.allocator->Free(on_s);
    });
    if (other_thread.wait_for(std::chrono::seconds(20)) != std::future_status::ready) {
      std::fprintf(stderr, "Free on stream S blocked behind EmptyCache\n");
      std::abort();
    }
    CHECK(other_thread.get().ok());
  };

  REQUIRE(h.allocator->EmptyCache().ok());
  h.intercepting.after_synchronize_device = nullptr;
  INFO(absl::StrJoin(h.violations, "\n"));
  CHECK(h.violations.empty());
  CHECK(freed_during_empty);  // EmptyCache had T's memory to give back, so it synchronized
  const size_t violations_during_empty = h.violations.size();
  if (!freed_during_empty) REQUIRE(h.allocator->Free(on_s).ok());
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device.used_bytes() == 0);
  CHECK(h.device.live_segments() == 0);
  CHECK(h.violations.size() == violations_during_empty);  // none during the clean-up
}

TEST_CASE("a thread that finds its stream's shard busy allocates from a lane of its own") {
  // Thread A allocates on S while the shard's lock is held for long: inside the lock, its
  // allocation harvests a pending event, and the device's event query waits for the test. Thread
  // B allocates on S meanwhile: it must not wait for A, but take its block from a lane of its
  // own, and every block must go back to where it came from.
  ReclaimHarness h;
  void* used_elsewhere = h.Allocate(4096, h.s);
  const uint64_t u_work = h.device.Enqueue(h.u);
  REQUIRE(h.allocator->RecordStream(used_elsewhere, h.u).ok());
  REQUIRE(h.allocator->Free(used_elsewhere).ok());  // pending on U's event: A will query it

  std::promise<void> a_inside;
  std::promise<void> release_a;
  std::shared_future<void> released = release_a.get_future().share();
  std::atomic<bool> first{true};
  h.intercepting.after_event_check = [&] {
    if (!first.exchange(false)) return;
    a_inside.set_value();
    released.wait();
  };
  std::future<void*> a = std::async(std::launch::async, [&] { return h.Allocate(8192, h.s); });
  a_inside.get_future().wait();
  std::future<void*> b = std::async(std::launch::async, [&] { return h.Allocate(8192, h.s); });
  const bool b_waited_for_a = b.wait_for(std::chrono::seconds(20)) != std::future_status::ready;
  release_a.set_value();
  void* from_a = a.get();
  void* from_b = b.get();
  h.intercepting.after_event_check = nullptr;
  CHECK_FALSE(b_waited_for_a);
  CHECK(from_a != from_b);
  // The snapshot shows B's block in a segment of another lane of the same stream.
  const std::string snapshot = h.allocator->SnapshotJson();
  INFO(snapshot);
  CHECK(snapshot.find("\"lane\":0,") != std::string::npos);   // A's, the shard it waited in
  CHECK(std::regex_search(snapshot, std::regex("\"lane\":[1-9]")));  // B's own
  h.device.Complete(h.u, u_work);
  REQUIRE(h.allocator->Free(from_a).ok());
  REQUIRE(h.allocator->Free(from_b).ok());
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device.used_bytes() == 0);
  CHECK(h.allocator->GetStats().active_blocks.current == 0);
}

}  // namespace
}  // namespace tidepool
