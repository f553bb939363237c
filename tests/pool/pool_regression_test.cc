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

// Catch prints PoolIds in failures.
namespace Catch {
template <>
struct StringMaker<tidepool::PoolId> {
  static std::string convert(const tidepool::PoolId& id) { return id.ToString(); }
};
}  // namespace Catch

namespace tidepool {
namespace {

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

// One simulated device, its allocator and its pool manager (destroyed in that reverse order).
struct Harness {
  explicit Harness(bool expandable = true, size_t capacity = size_t{1} << 30,
                   SimulatedDevice::Options options = {}) {
    options.capacity = capacity;
    device = std::make_unique<SimulatedDevice>(options);
    Config config;
    config.expandable_segments = expandable;
    absl::StatusOr<std::unique_ptr<CachingAllocator>> made =
        CachingAllocator::Create(device.get(), config);
    REQUIRE(made.ok());
    allocator = std::move(*made);
    manager = std::make_unique<PoolManager>(allocator.get());
  }

  Stream NewStream() {
    absl::StatusOr<Stream> stream = device->CreateStream();
    REQUIRE(stream.ok());
    return *stream;
  }
  StreamId IdOf(Stream stream) {
    absl::StatusOr<StreamId> id = device->GetStreamId(stream);
    REQUIRE(id.ok());
    return *id;
  }

  void Begin(PoolId pool, const RouteFilter& filter) {
    absl::Status status = manager->Begin(pool, filter);
    INFO("Begin(" << pool.ToString() << ", " << filter.ToString() << "): " << status.ToString());
    REQUIRE(status.ok());
  }
  void End(PoolId pool) {
    absl::Status status = manager->End(pool);
    INFO("End(" << pool.ToString() << "): " << status.ToString());
    REQUIRE(status.ok());
  }
  void Release(PoolId pool) {
    absl::Status status = manager->Release(pool);
    INFO("Release(" << pool.ToString() << "): " << status.ToString());
    REQUIRE(status.ok());
  }

  // An allocation through the manager; checks that it lands where RouteOf said it would.
  void* Allocate(size_t bytes, Stream stream) {
    absl::StatusOr<PoolId> route = manager->RouteOf(stream);
    INFO("RouteOf: " << route.status().ToString());
    REQUIRE(route.ok());
    absl::StatusOr<void*> ptr = manager->Allocate(bytes, stream);
    INFO("Allocate(" << bytes << "): " << ptr.status().ToString());
    REQUIRE(ptr.ok());
    REQUIRE(PoolOf(*ptr) == *route);
    return *ptr;
  }
  void Free(void* ptr) {
    absl::Status status = allocator->Free(ptr);
    INFO("Free: " << status.ToString());
    REQUIRE(status.ok());
  }

  PoolId RouteOf(Stream stream) {
    absl::StatusOr<PoolId> route = manager->RouteOf(stream);
    INFO("RouteOf: " << route.status().ToString());
    REQUIRE(route.ok());
    return *route;
  }
  PoolId PoolOf(const void* ptr) {
    absl::StatusOr<PoolId> pool = manager->PoolOf(ptr);
    INFO("PoolOf: " << pool.status().ToString());
    REQUIRE(pool.ok());
    return *pool;
  }
  PoolInfo Info(PoolId pool) {
    absl::StatusOr<PoolInfo> info = manager->Info(pool);
    INFO("Info(" << pool.ToString() << "): " << info.status().ToString());
    REQUIRE(info.ok());
    return *info;
  }
  AllocatorStats Stats(PoolId pool) {
    absl::StatusOr<AllocatorStats> stats = manager->Stats(pool);
    INFO("Stats(" << pool.ToString() << "): " << stats.status().ToString());
    REQUIRE(stats.ok());
    return *stats;
  }

  std::unique_ptr<SimulatedDevice> device;
  std::unique_ptr<CachingAllocator> allocator;
  std::unique_ptr<PoolManager> manager;
};

// The bug: thread T begins P for itself (P: 1 reference, 1 route); the main thread begins P for
// everyone (2, 2) and released one reference (1, 2), which Release allowed because it was not
// the last. T's exit then ended its route and dropped "its" reference: 0 references, 1 route,
// and every allocation on the device failed. Now Release refuses to leave a pool fewer
// references than routes, so T's exit leaves (1, 1) and everything keeps working.
TEST_CASE("a pool never has fewer references than routes, whoever releases and exits") {
  Harness h;
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
  Harness h(/*expandable=*/true, size_t{80} << 30);  // an H100-sized device
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
  Harness h;
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  Stream capturing = h.NewStream();
  const PoolId pool = NewUserPoolId();
  PoolScope scope(h.manager.get(), pool);
  void* block = h.Allocate(4096, a);
  h.device->Enqueue(b);
  REQUIRE(h.allocator->RecordStream(block, b).ok());
  h.Free(block);  // pending on b's event
  h.device->BeginCapture(capturing);
  absl::StatusOr<void*> during = h.manager->Allocate(4096, a);
  h.device->EndCapture(capturing);
  INFO("Allocate during a capture elsewhere: " << during.status().ToString());
  CHECK(h.Info(pool).references == 1);  // the pool is alive and routed
  if (!during.ok()) {
    CHECK_FALSE(absl::StrContains(during.status().message(), "released while still routed"));
  } else {
    h.Free(*during);
  }
}

}  // namespace
}  // namespace tidepool
