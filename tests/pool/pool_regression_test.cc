// Regression tests for bugs found in pool/ (and the allocator under it) while the pool tests were
// written: each case stages the situation that went wrong and checks the behaviour docs/pools.md
// promises.
#include <catch2/catch.hpp>

#include <malloc.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "allocator/stats.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"
#include "tests/pool/pool_harness.h"

namespace tidepool {
namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kGiB = size_t{1} << 30;

using testing::PoolHarness;

// The bug: thread T begins P for itself (P: 1 reference, 1 route); the main thread begins P for
// everyone (2, 2) and released one reference (1, 2), which Release allowed because it was not
// the last. T's exit then ended its route and dropped "its" reference: 0 references, 1 route,
// and every allocation on the device failed. Now Release refuses to leave a pool fewer
// references than routes, so T's exit leaves (1, 1) and everything keeps working.
TEST_CASE("a pool never has fewer references than routes, whoever releases and exits") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  std::atomic<int> phase{0};
  absl::Status begun;
  std::thread worker([&] {
    begun = h.manager->Begin(pool, RouteFilter::CurrentThread());
    phase.store(1);
    while (phase.load() != 2) std::this_thread::yield();
  });
  while (phase.load() != 1) std::this_thread::yield();
  h.Begin(pool, RouteFilter::Everyone());
  CHECK(absl::IsFailedPrecondition(h.manager->Release(pool)));  // would leave 1 for 2 routes
  phase.store(2);
  worker.join();
  REQUIRE(begun.ok());

  const PoolInfo info = h.Info(pool);
  INFO("after the worker's exit: references " << info.references << ", routes " << info.routes
                                              << (info.released ? ", released" : ""));
  // The rule Release enforces: a pool that is routed keeps at least one reference.
  CHECK((info.routes == 0 || info.references > 0));
  absl::StatusOr<void*> block = h.manager->Allocate(4096, stream);
  INFO("Allocate: " << block.status().ToString());
  CHECK(block.ok());
  if (block.ok()) {
    CHECK(*h.manager->PoolOf(*block) == pool);  // the everyone route still leads to P
    h.Free(*block);
  }
  REQUIRE(h.manager->End(pool).ok());
  REQUIRE(h.manager->Release(pool).ok());
  CHECK(h.Info(pool).released);
}

// The bug: every time a pool that was gone was begun again, Begin made a new arena, and the
// allocator kept every arena, shard, segment record and page-map leaf it ever made: the sglang
// pattern (a PoolScope around each operation on a pool nobody else holds) grew host memory by
// ~60 KiB per scope and slowed every walk over arenas. Now a pool keeps its arena, and a retired
// arena keeps its address ranges, so scopes reuse the same segments.
TEST_CASE("a pool begun and released again and again does not grow host memory") {
  PoolHarness h(/*expandable=*/true, size_t{80} << 30);  // an H100-sized device
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  auto cycle = [&] {
    PoolScope scope(h.manager.get(), pool);
    void* block = *h.manager->Allocate(4096, stream);
    h.allocator->Free(block).IgnoreError();
  };
  // Heap in use: small chunks plus chunks malloc mapped on their own (large arrays).
  auto heap_in_use = [] {
    const struct mallinfo2 info = mallinfo2();
    return info.uordblks + info.hblkhd;
  };
  for (int i = 0; i < 100; ++i) cycle();  // warm up
  const size_t before = heap_in_use();
  constexpr int kCycles = 2000;
  for (int i = 0; i < kCycles; ++i) cycle();
  const size_t after = heap_in_use();
  const double per_cycle = (static_cast<double>(after) - static_cast<double>(before)) / kCycles;
  INFO("host heap in use grew by " << (after - before) << " bytes over " << kCycles
                                   << " scopes (" << per_cycle << " bytes per scope)");
  CHECK(h.device->used_bytes() == 0);
  CHECK(per_cycle < 256.0);
}

// The bug: PoolManager::Allocate turned every FAILED_PRECONDITION from a routed allocation into
// "the pool was released while still routed", though the allocator answers FAILED_PRECONDITION
// for other reasons too (here an event query refused because a capture runs on another stream).
TEST_CASE("a routed allocation's error blames the pool only when the pool was released") {
  PoolHarness h;
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  Stream capturing = h.NewStream();
  const PoolId pool = NewUserPoolId();
  PoolScope scope(h.manager.get(), pool);
  void* block = h.Allocate(4096, a);
  h.device->Enqueue(b);
  REQUIRE(h.allocator->RecordStream(block, b).ok());
  h.Free(block);  // pending on b's event
  REQUIRE(h.device->BeginCapture(capturing).ok());
  absl::StatusOr<void*> during = h.manager->Allocate(4096, a);
  absl::StatusOr<GraphHandle> graph = h.device->EndCapture(capturing);
  REQUIRE(graph.ok());
  REQUIRE(h.device->DestroyGraph(*graph).ok());
  INFO("Allocate during a capture elsewhere: " << during.status().ToString());
  CHECK(h.Info(pool).references == 1);  // the pool is alive and routed
  if (!during.ok()) {
    CHECK_FALSE(absl::StrContains(during.status().message(), "released while still routed"));
  } else {
    h.Free(*during);
  }
}

// The bug: gone arenas were never dropped, so growth, empty_cache and out-of-memory recovery
// walked every pool ever made (a program that captures often makes one per graph): with 20,000
// dead pools an empty_cache with nothing to free took 5 ms. Now only arenas in use, and gone ones
// still holding address ranges, are walked, and the first EmptyCache takes those off.
TEST_CASE("walks over arenas visit pools in use, not every pool there ever was") {
  for (bool expandable : {true, false}) {
    CAPTURE(expandable);
    PoolHarness h(expandable);
    Stream stream = h.NewStream();
    constexpr int kPools = 20000;
    for (int i = 0; i < kPools; ++i) {
      const PoolId pool = i % 2 == 0 ? NewUserPoolId() : NewGraphPoolId();
      PoolScope scope(h.manager.get(), pool);
      h.Free(h.Allocate(i % 3 == 0 ? 3 * kMiB : 4096, stream));
    }
    // Gone: nothing but address ranges are left of them, and only in expandable arenas.
    CHECK(h.allocator->walked_arenas() <= 1 + kPools);
    REQUIRE(h.allocator->EmptyCache().ok());
    CHECK(h.allocator->walked_arenas() == 1);
    CHECK(h.device->used_bytes() == 0);
    // A pool in use is walked; once it is gone and empty, it is not.
    const PoolId live = NewUserPoolId();
    h.Begin(live, RouteFilter::CurrentThread());
    void* block = h.Allocate(kMiB, stream);
    CHECK(h.allocator->walked_arenas() == 2);
    h.End(live);
    h.Release(live);
    CHECK(h.allocator->walked_arenas() == 2);  // retired, its block still live
    h.Free(block);
    REQUIRE(h.allocator->EmptyCache().ok());
    CHECK(h.allocator->walked_arenas() == 1);
    // Begun again, it is walked again; out-of-memory recovery still finds every byte.
    h.Begin(live, RouteFilter::CurrentThread());
    CHECK(h.allocator->walked_arenas() == 2);
    absl::StatusOr<void*> most = h.manager->Allocate(kGiB - 64 * kMiB, stream);
    REQUIRE(most.ok());
    h.End(live);
    h.Release(live);
    h.Free(*most);
    absl::StatusOr<void*> whole = h.allocator->Allocate(kGiB - 64 * kMiB, stream);
    REQUIRE(whole.ok());
    h.Free(*whole);
  }
}

// The bug: a release refused because thread exit had already dropped the reference (rule 10)
// said "(a double release)".
TEST_CASE("a release refused after thread exit dropped the references says so") {
  PoolHarness h;
  const PoolId pool = NewUserPoolId();
  std::thread worker([&] { h.manager->Begin(pool, RouteFilter::CurrentThread()).IgnoreError(); });
  worker.join();
  absl::Status refused = h.manager->Release(pool);
  CHECK(absl::IsFailedPrecondition(refused));
  CHECK(absl::StrContains(refused.message(), "dropped when threads exited"));
  CHECK_FALSE(absl::StrContains(refused.message(), "double release"));
  const PoolId other = NewUserPoolId();
  h.Begin(other, RouteFilter::CurrentThread());
  h.End(other);
  h.Release(other);
  CHECK(absl::StrContains(h.manager->Release(other).message(), "a double release"));
}

}  // namespace
}  // namespace tidepool
