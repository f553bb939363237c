// Routing with several threads and several devices (pool/pool_manager.h, docs/pools.md).
//
//   * two threads redirected to different pools at the same time, while a third allocates with
//     no route of its own: every block of every thread lands in that thread's pool;
//   * redirection through one device's manager leaves another device's manager alone, on the same
//     thread, including at thread exit;
//   * a thread that outlives its manager exits cleanly (its routes are not touched: the manager
//     is gone).
// Catch's assertions are not made from the worker threads: they count what they saw, and the
// main thread checks after joining them.
#include <catch2/catch.hpp>

#include <atomic>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
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

constexpr size_t kKiB = size_t{1} << 10;

using testing::PoolHarness;

// What one worker saw.
struct Tally {
  int64_t allocations = 0;
  int64_t wrong_route = 0;  // RouteOf disagreed with the thread's pool
  int64_t wrong_pool = 0;   // PoolOf of a block disagreed with the thread's pool
  int64_t errors = 0;       // any call that failed
  std::string first_problem;

  void Problem(std::string what) {
    if (first_problem.empty()) first_problem = std::move(what);
  }
};

// Allocates and frees `ops` times on `stream`, expecting every block in `pool`, keeping up to 32
// blocks live; frees everything at the end.
void Churn(PoolManager& manager, CachingAllocator& allocator, Stream stream, PoolId pool,
           uint64_t seed, int ops, Tally& tally) {
  std::mt19937_64 random(seed);
  std::vector<void*> live;
  for (int op = 0; op < ops; ++op) {
    if (live.size() < 32 && (live.empty() || random() % 2 == 0)) {
      absl::StatusOr<PoolId> route = manager.RouteOf(stream);
      if (!route.ok() || *route != pool) {
        ++tally.wrong_route;
        tally.Problem(absl::StrCat("RouteOf: ", route.ok() ? route->ToString()
                                                            : route.status().ToString()));
      }
      const size_t bytes = 1 + random() % (random() % 8 == 0 ? 4 << 20 : 64 << 10);
      absl::StatusOr<void*> ptr = manager.Allocate(bytes, stream);
      if (!ptr.ok()) {
        ++tally.errors;
        tally.Problem(absl::StrCat("Allocate: ", ptr.status().ToString()));
        continue;
      }
      ++tally.allocations;
      absl::StatusOr<PoolId> of = manager.PoolOf(*ptr);
      if (!of.ok() || *of != pool) {
        ++tally.wrong_pool;
        tally.Problem(absl::StrCat("PoolOf: ", of.ok() ? of->ToString() : of.status().ToString()));
      }
      live.push_back(*ptr);
    } else {
      const size_t index = random() % live.size();
      if (!allocator.Free(live[index]).ok()) ++tally.errors;
      live[index] = live.back();
      live.pop_back();
    }
  }
  for (void* ptr : live) {
    if (!allocator.Free(ptr).ok()) ++tally.errors;
  }
}

void CheckTally(const Tally& tally, const char* who) {
  INFO(who << ": " << tally.first_problem);
  CHECK(tally.allocations > 0);
  CHECK(tally.wrong_route == 0);
  CHECK(tally.wrong_pool == 0);
  CHECK(tally.errors == 0);
}

TEST_CASE("two threads redirected to different pools at once, a third in the default pool") {
  PoolHarness h;
  const PoolId pools[2] = {NewUserPoolId(), NewUserPoolId()};
  Stream streams[3] = {h.NewStream(), h.NewStream(), h.NewStream()};
  constexpr int kOps = 20000;
  Tally tallies[3];
  int64_t references_inside[2] = {-1, -1};
  std::atomic<int> inside{0};
  std::atomic<bool> go{false};

  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      PoolScope scope(h.manager.get(), pools[t]);
      if (!scope.status().ok()) ++tallies[t].errors;
      // Both scopes are open before either thread allocates.
      inside.fetch_add(1);
      while (!go.load()) std::this_thread::yield();
      Churn(*h.manager, *h.allocator, streams[t], pools[t], 1000 + t, kOps, tallies[t]);
      references_inside[t] = h.manager->Info(pools[t]).value_or(PoolInfo{}).references;
    });
  }
  threads.emplace_back([&] {
    while (!go.load()) std::this_thread::yield();
    Churn(*h.manager, *h.allocator, streams[2], kDefaultPool, 1002, kOps, tallies[2]);
  });
  while (inside.load() < 2) std::this_thread::yield();
  // The main thread, not routed, sees the default pool, on every stream.
  for (Stream stream : streams) CHECK(h.RouteOf(stream) == kDefaultPool);
  go.store(true);
  for (std::thread& thread : threads) thread.join();

  CheckTally(tallies[0], "thread 0");
  CheckTally(tallies[1], "thread 1");
  CheckTally(tallies[2], "thread 2 (not routed)");
  for (int t = 0; t < 2; ++t) {
    CHECK(references_inside[t] == 1);
    const PoolInfo info = h.Info(pools[t]);
    CHECK(info.references == 0);
    CHECK(info.routes == 0);
    CHECK(info.released);
    CHECK(info.live_blocks == 0);
    CHECK(h.Stats(pools[t]).reserved_bytes.current == 0);  // gone
    CHECK(h.Stats(pools[t]).allocated_bytes.peak > 0);
  }
  CHECK(h.Stats(kDefaultPool).active_blocks.current == 0);
  CHECK(h.Stats(kDefaultPool).allocated_bytes.peak > 0);
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device->used_bytes() == 0);
  CHECK(h.device->live_segments() == 0);
}

TEST_CASE("redirection on one device leaves another device alone (same thread)") {
  SimulatedDevice::Options second;
  second.ordinal = 1;
  second.base_address = uintptr_t{0x7e0000000000};
  PoolHarness d0;
  PoolHarness d1(/*expandable=*/true, size_t{1} << 30, second);
  Stream s0 = d0.NewStream();
  Stream s1 = d1.NewStream();
  const PoolId pool = NewUserPoolId();

  d0.Begin(pool, RouteFilter::CurrentThread());
  CHECK(d0.RouteOf(s0) == pool);
  CHECK(d1.RouteOf(s1) == kDefaultPool);
  CHECK(absl::IsNotFound(d1.manager->Info(pool).status()));
  void* on_d1 = d1.Allocate(kKiB, s1);
  CHECK(d1.PoolOf(on_d1) == kDefaultPool);
  // d1 has nothing to end, and refusing leaves d0's route alone.
  CHECK(absl::IsFailedPrecondition(d1.manager->End(pool)));
  CHECK(d0.RouteOf(s0) == pool);

  // The same id on d1 is a different pool, with its own references.
  {
    PoolScope scope(d1.manager.get(), pool);
    CHECK(d1.Info(pool).references == 1);
    CHECK(d0.Info(pool).references == 1);
    void* a = d0.Allocate(kKiB, s0);
    void* b = d1.Allocate(kKiB, s1);
    CHECK(d0.PoolOf(a) == pool);
    CHECK(d1.PoolOf(b) == pool);
    CHECK(d0.Stats(pool).active_blocks.current == 1);
    CHECK(d1.Stats(pool).active_blocks.current == 1);
    d0.Free(a);
    d1.Free(b);
  }
  CHECK(d1.Info(pool).released);
  CHECK_FALSE(d0.Info(pool).released);
  CHECK(d0.RouteOf(s0) == pool);
  d0.End(pool);
  d0.Release(pool);
  d1.Free(on_d1);

  // A thread exiting with routes open on both devices has both ended, each on its own device.
  const PoolId p0 = NewUserPoolId();
  const PoolId p1 = NewUserPoolId();
  absl::Status statuses[2];
  std::thread([&] {
    statuses[0] = d0.manager->Begin(p0, RouteFilter::CurrentThread());
    statuses[1] = d1.manager->Begin(p1, RouteFilter::CurrentThread());
  }).join();
  CHECK(statuses[0].ok());
  CHECK(statuses[1].ok());
  CHECK(d0.Info(p0).routes == 0);
  CHECK(d0.Info(p0).released);
  CHECK(d1.Info(p1).routes == 0);
  CHECK(d1.Info(p1).released);
  CHECK(absl::IsNotFound(d0.manager->Info(p1).status()));
  CHECK(absl::IsNotFound(d1.manager->Info(p0).status()));
  REQUIRE(d0.allocator->EmptyCache().ok());
  REQUIRE(d1.allocator->EmptyCache().ok());
  CHECK(d0.device->used_bytes() == 0);
  CHECK(d1.device->used_bytes() == 0);
}

TEST_CASE("a thread that outlives its manager exits cleanly") {
  PoolHarness h;
  const PoolId pool = NewUserPoolId();
  std::atomic<int> phase{0};
  absl::Status begun;
  std::thread worker([&] {
    begun = h.manager->Begin(pool, RouteFilter::CurrentThread());
    phase.store(1);
    while (phase.load() != 2) std::this_thread::yield();
    // Exits with the route open, after its manager is gone and another took its place.
  });
  while (phase.load() != 1) std::this_thread::yield();
  h.manager.reset();
  h.manager = std::make_unique<PoolManager>(h.allocator.get());
  phase.store(2);
  worker.join();
  CHECK(begun.ok());
  CHECK(h.Info(kDefaultPool).routes == 0);
  CHECK(absl::IsNotFound(h.manager->Info(pool).status()));
  Stream stream = h.NewStream();
  CHECK(h.RouteOf(stream) == kDefaultPool);
}

}  // namespace
}  // namespace tidepool
