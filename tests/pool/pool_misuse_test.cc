// The misuse matrix (pool/pool_manager.h, docs/pools.md): every misuse returns its documented
// error code and changes nothing.
//
// A state with every kind of pool is built first: one routed for the calling thread with a spare
// reference, one routed for a stream with its only reference, one routed for everyone, one
// released with a live block, one gone, one never known, and the default pool. Each misuse runs
// in its own SECTION against that state, and afterwards the whole observable state is compared
// with what it was before: Info of every pool, the routing decision for two streams from this
// thread and from another one, Stats of every pool and of the allocator, the device's memory,
// and PoolOf of every live block.
//
//   End without Begin                         FAILED_PRECONDITION
//   Release of a pool the device never had    NOT_FOUND
//   Release with no references left           FAILED_PRECONDITION   (double release; gone pool)
//   Release of the last reference, routed     FAILED_PRECONDITION
//   Release of the default pool               INVALID_ARGUMENT
//   Create of an id the device has had        ALREADY_EXISTS
//   Trim / Stats / Snapshot / Info, unknown   NOT_FOUND
#include <catch2/catch.hpp>

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/match.h"
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
constexpr size_t kMiB = size_t{1} << 20;

using testing::PoolHarness;

std::string Describe(const Stat& stat) {
  return absl::StrCat(stat.current, "/", stat.peak, "/", stat.added, "/", stat.removed);
}
std::string Describe(const AllocatorStats& stats) {
  return absl::StrCat("requested ", Describe(stats.requested_bytes), " allocated ",
                      Describe(stats.allocated_bytes), " active ", Describe(stats.active_blocks),
                      " reserved ", Describe(stats.reserved_bytes), " segments ",
                      Describe(stats.segments), " device_allocations ",
                      stats.device_allocations, " device_frees ", stats.device_frees, " retries ",
                      stats.retries, " ooms ", stats.ooms);
}
std::string Describe(const absl::StatusOr<PoolInfo>& info) {
  if (!info.ok()) return info.status().ToString();
  return absl::StrCat("references ", info->references, " routes ", info->routes, " live ",
                      info->live_blocks, info->released ? " released" : "");
}
std::string Describe(const absl::StatusOr<PoolId>& id) {
  return id.ok() ? id->ToString() : id.status().ToString();
}

// The state every misuse starts from, and everything observable about it.
struct World {
  World() {
    a = h.NewStream();
    b = h.NewStream();
    // everyone route, oldest: its only reference.
    h.Begin(everyone, RouteFilter::Everyone());
    blocks.push_back(h.Allocate(kKiB, a));
    // current thread, two references, one route.
    h.Begin(thread_routed, RouteFilter::CurrentThread());
    h.Begin(thread_routed, RouteFilter::CurrentThread());
    h.End(thread_routed);
    blocks.push_back(h.Allocate(2 * kMiB, a));
    // stream b, its only reference.
    h.Begin(stream_routed, RouteFilter::OnStream(h.IdOf(b)));
    blocks.push_back(h.Allocate(3 * kKiB, b));
    // released with a live block.
    h.Begin(released, RouteFilter::CurrentThread());
    blocks.push_back(h.Allocate(5 * kKiB, a));
    h.End(released);
    h.Release(released);
    // gone.
    {
      PoolScope scope(h.manager.get(), gone);
      h.Free(h.Allocate(kKiB, a));
    }
    // and the default pool, with a block and a cache.
    h.Begin(kDefaultPool, RouteFilter::CurrentThread());
    blocks.push_back(h.Allocate(7 * kKiB, a));
    h.Free(h.Allocate(9 * kMiB, a));
    h.End(kDefaultPool);
    // A freed pointer, for PoolOf.
    freed = h.Allocate(kKiB, a);
    h.Free(freed);

    REQUIRE(h.RouteOf(a) == thread_routed);
    REQUIRE(h.RouteOf(b) == stream_routed);
    REQUIRE(h.Info(thread_routed).references == 2);
    REQUIRE(h.Info(released).released);
    REQUIRE(h.Info(released).live_blocks == 1);
    REQUIRE(h.Stats(gone).reserved_bytes.current == 0);
  }

  ~World() {
    for (void* ptr : blocks) h.allocator->Free(ptr).IgnoreError();
  }

  // Everything observable, as text, so that a difference prints itself.
  std::string Observe() {
    std::string out;
    for (PoolId pool : {kDefaultPool, everyone, thread_routed, stream_routed, released, gone,
                        unknown}) {
      absl::StrAppend(&out, pool.ToString(), ": ", Describe(h.manager->Info(pool)), "\n");
      absl::StatusOr<AllocatorStats> stats = h.manager->Stats(pool);
      absl::StrAppend(&out, "  stats: ",
                      stats.ok() ? Describe(*stats) : stats.status().ToString(), "\n");
    }
    absl::StrAppend(&out, "this thread: a -> ", Describe(h.manager->RouteOf(a)), ", b -> ",
                    Describe(h.manager->RouteOf(b)), "\n");
    std::string other;
    std::thread([&] {
      other = absl::StrCat("another thread: a -> ", Describe(h.manager->RouteOf(a)), ", b -> ",
                           Describe(h.manager->RouteOf(b)), "\n");
    }).join();
    out += other;
    absl::StrAppend(&out, "allocator: ", Describe(h.allocator->GetStats()), "\n");
    absl::StrAppend(&out, "device: ", h.device->used_bytes(), " bytes, ",
                    h.device->live_segments(), " segments\n");
    for (void* ptr : blocks) {
      absl::StrAppend(&out, "block ", reinterpret_cast<uintptr_t>(ptr), " in ",
                      Describe(h.manager->PoolOf(ptr)), "\n");
    }
    return out;
  }

  PoolHarness h;
  Stream a = nullptr;
  Stream b = nullptr;
  const PoolId everyone = NewUserPoolId();
  const PoolId thread_routed = NewUserPoolId();
  const PoolId stream_routed = NewUserPoolId();
  const PoolId released = NewUserPoolId();
  const PoolId gone = NewUserPoolId();
  const PoolId unknown = NewUserPoolId();
  std::vector<void*> blocks;
  void* freed = nullptr;
};

// Runs a misuse: it must fail with `code`, name `pool` in its message (unless it is the default
// pool), and leave the world as it was.
void ExpectRefused(World& world, absl::StatusCode code, PoolId pool,
                   const std::function<absl::Status()>& misuse) {
  const std::string before = world.Observe();
  const absl::Status status = misuse();
  INFO("status: " << status.ToString());
  CHECK(status.code() == code);
  if (!pool.is_default()) CHECK(absl::StrContains(status.message(), pool.ToString()));
  const std::string after = world.Observe();
  CHECK(after == before);
}

TEST_CASE("End without a matching Begin: FAILED_PRECONDITION, nothing changed") {
  World w;
  PoolManager& m = *w.h.manager;
  const auto code = absl::StatusCode::kFailedPrecondition;
  SECTION("a pool the device never had") {
    ExpectRefused(w, code, w.unknown, [&] { return m.End(w.unknown); });
  }
  SECTION("a released pool") {
    ExpectRefused(w, code, w.released, [&] { return m.End(w.released); });
  }
  SECTION("a gone pool") {
    ExpectRefused(w, code, w.gone, [&] { return m.End(w.gone); });
  }
  SECTION("the default pool, not routed") {
    ExpectRefused(w, code, kDefaultPool, [&] { return m.End(kDefaultPool); });
  }
  SECTION("another thread's current-thread route is not this thread's to end") {
    ExpectRefused(w, code, w.thread_routed, [&] {
      absl::Status status;
      std::thread([&] { status = m.End(w.thread_routed); }).join();
      return status;
    });
  }
  SECTION("one End too many") {
    w.h.End(w.thread_routed);
    ExpectRefused(w, code, w.thread_routed, [&] { return m.End(w.thread_routed); });
  }
}

TEST_CASE("Release of a pool the device never had: NOT_FOUND, nothing changed") {
  World w;
  ExpectRefused(w, absl::StatusCode::kNotFound, w.unknown,
                [&] { return w.h.manager->Release(w.unknown); });
  // Nor does a graph-style id the device never had exist.
  const PoolId graph = NewGraphPoolId();
  ExpectRefused(w, absl::StatusCode::kNotFound, graph,
                [&] { return w.h.manager->Release(graph); });
}

TEST_CASE("Release with no references left (a double release): FAILED_PRECONDITION") {
  World w;
  const auto code = absl::StatusCode::kFailedPrecondition;
  SECTION("released, blocks still live") {
    ExpectRefused(w, code, w.released, [&] { return w.h.manager->Release(w.released); });
  }
  SECTION("gone") {
    ExpectRefused(w, code, w.gone, [&] { return w.h.manager->Release(w.gone); });
  }
  SECTION("Begin, End, Release, Release") {
    const PoolId pool = NewUserPoolId();
    w.h.Begin(pool, RouteFilter::Everyone());
    w.h.End(pool);
    w.h.Release(pool);
    ExpectRefused(w, code, pool, [&] { return w.h.manager->Release(pool); });
  }
}

TEST_CASE("Release of the last reference while still routed: FAILED_PRECONDITION") {
  World w;
  const auto code = absl::StatusCode::kFailedPrecondition;
  SECTION("routed for a stream") {
    ExpectRefused(w, code, w.stream_routed,
                  [&] { return w.h.manager->Release(w.stream_routed); });
  }
  SECTION("routed for everyone") {
    ExpectRefused(w, code, w.everyone, [&] { return w.h.manager->Release(w.everyone); });
  }
  SECTION("routed for the current thread, after the spare reference is gone") {
    w.h.Release(w.thread_routed);  // the spare one: allowed
    CHECK(w.h.Info(w.thread_routed).references == 1);
    CHECK(w.h.RouteOf(w.a) == w.thread_routed);
    ExpectRefused(w, code, w.thread_routed,
                  [&] { return w.h.manager->Release(w.thread_routed); });
    // From another thread too.
    ExpectRefused(w, code, w.thread_routed, [&] {
      absl::Status status;
      std::thread([&] { status = w.h.manager->Release(w.thread_routed); }).join();
      return status;
    });
  }
}

TEST_CASE("Release of the default pool: INVALID_ARGUMENT, nothing changed") {
  World w;
  ExpectRefused(w, absl::StatusCode::kInvalidArgument, kDefaultPool,
                [&] { return w.h.manager->Release(kDefaultPool); });
  // Also while it is routed.
  w.h.Begin(kDefaultPool, RouteFilter::CurrentThread());
  ExpectRefused(w, absl::StatusCode::kInvalidArgument, kDefaultPool,
                [&] { return w.h.manager->Release(kDefaultPool); });
  w.h.End(kDefaultPool);
}

TEST_CASE("Create of an id the device has had: ALREADY_EXISTS, nothing changed") {
  World w;
  PoolManager& m = *w.h.manager;
  const auto code = absl::StatusCode::kAlreadyExists;
  for (PoolId pool : {w.thread_routed, w.stream_routed, w.released, w.gone, kDefaultPool}) {
    INFO("pool " << pool.ToString());
    ExpectRefused(w, code, pool, [&] { return m.Create(pool, PoolOptions{}); });
  }
}

TEST_CASE("Trim, Stats, Snapshot and Info of a pool the device never had: NOT_FOUND") {
  World w;
  PoolManager& m = *w.h.manager;
  const auto code = absl::StatusCode::kNotFound;
  ExpectRefused(w, code, w.unknown, [&] { return m.Trim(w.unknown); });
  ExpectRefused(w, code, w.unknown, [&] { return m.Stats(w.unknown).status(); });
  ExpectRefused(w, code, w.unknown, [&] { return m.Snapshot(w.unknown).status(); });
  ExpectRefused(w, code, w.unknown, [&] { return m.Info(w.unknown).status(); });
}

TEST_CASE("PoolOf of a pointer that is not a live block is an error, and changes nothing") {
  World w;
  ExpectRefused(w, absl::StatusCode::kFailedPrecondition, kDefaultPool,
                [&] { return w.h.manager->PoolOf(w.freed).status(); });
  int on_the_host = 0;
  ExpectRefused(w, absl::StatusCode::kInvalidArgument, kDefaultPool,
                [&] { return w.h.manager->PoolOf(&on_the_host).status(); });
}

TEST_CASE("a refused allocation inside a routed region changes nothing") {
  World w;
  ExpectRefused(w, absl::StatusCode::kInvalidArgument, kDefaultPool,
                [&] { return w.h.manager->Allocate(0, w.a).status(); });
  Stream bogus = reinterpret_cast<Stream>(uintptr_t{0xdead0});
  ExpectRefused(w, absl::StatusCode::kInvalidArgument, kDefaultPool,
                [&] { return w.h.manager->Allocate(kKiB, bogus).status(); });
}

}  // namespace
}  // namespace tidepool
