// Tests of a pool's life (pool/pool_manager.h, docs/pools.md): references, release, revival,
// the end of a pool, its options, per-pool observation, ids, and threads that exit while
// redirected.
//
//   * Release at zero returns the pool's free memory at once, and the rest as its last live
//     blocks are freed; then the pool is gone (SimulatedDevice::used_bytes, Stats, Snapshot);
//   * a pool whose references reached zero while blocks were live can be begun again: it is the
//     same pool (same id, same arena and statistics), not an error (PyTorch asserts here);
//   * a pool that is gone begins afresh under the same id;
//   * memory given back by a released pool is given back only after the work that may use it;
//   * Trim, Stats and Snapshot of a pool see that pool only; options (segment source, whether
//     its free memory is shared) are those of the Begin that created it;
//   * user ids are {0, n}, graph ids {n, 0}, unique across threads;
//   * a thread that exits while redirected has its routes ended and its references released;
//     threads started inside a scope are not routed.
#include <catch2/catch.hpp>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/segment_source.h"
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

size_t Count(const std::string& text, const std::string& what) {
  size_t count = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) {
    ++count;
  }
  return count;
}

TEST_CASE("Release at zero returns the pool's free memory; the pool is gone after its last block") {
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  PoolHarness h(expandable);
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  REQUIRE(h.device->used_bytes() == 0);

  h.Begin(pool, RouteFilter::CurrentThread());
  void* first = h.Allocate(12 * kMiB, stream);
  void* second = h.Allocate(12 * kMiB, stream);
  void* small = h.Allocate(4 * kKiB, stream);
  h.End(pool);
  h.Free(first);
  const size_t held = h.device->used_bytes();
  REQUIRE(static_cast<int64_t>(held) == h.Stats(pool).reserved_bytes.current);

  h.Release(pool);
  PoolInfo info = h.Info(pool);
  CHECK(info.references == 0);
  CHECK(info.routes == 0);
  CHECK(info.released);
  CHECK(info.live_blocks == 2);
  // The free block's memory went back at once (12 MiB: its own segment, or its granules).
  const size_t after_release = h.device->used_bytes();
  CHECK(after_release <= held - 12 * kMiB);
  CHECK(static_cast<int64_t>(after_release) == h.Stats(pool).reserved_bytes.current);

  // A block freed while others are live may stay cached until the last one goes (as now), but
  // nothing more is ever taken.
  h.Free(second);
  CHECK(h.Info(pool).live_blocks == 1);
  CHECK(h.device->used_bytes() <= after_release);
  CHECK(h.Info(pool).released);

  h.Free(small);
  // Gone: no memory held, no block live or cached; Info still answers for the id. An expandable
  // segment keeps its address range (no memory) for the pool's next use, until EmptyCache.
  CHECK(h.device->used_bytes() == 0);
  const AllocatorStats stats = h.Stats(pool);
  CHECK(stats.reserved_bytes.current == 0);
  CHECK(stats.active_blocks.current == 0);
  absl::StatusOr<std::string> snapshot = h.manager->Snapshot(pool);
  REQUIRE(snapshot.ok());
  CHECK(Count(*snapshot, "\"state\":\"allocated\"") == 0);
  CHECK(Count(*snapshot, "\"state\":\"free\"") == 0);
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device->live_segments() == 0);
  CHECK(h.Stats(pool).segments.current == 0);
  info = h.Info(pool);
  CHECK(info.released);
  CHECK(info.live_blocks == 0);
  CHECK(info.references == 0);
}

TEST_CASE("Release at zero with no live blocks makes the pool gone at once") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  {
    PoolScope scope(h.manager.get(), pool);
    h.Free(h.Allocate(3 * kMiB, stream));
    CHECK(h.device->used_bytes() > 0);
  }
  CHECK(h.Info(pool).released);
  CHECK(h.device->used_bytes() == 0);
  CHECK(h.Stats(pool).reserved_bytes.current == 0);
}

TEST_CASE("a released pool gives memory back only after the work that may use it is done") {
  PoolHarness h(/*expandable=*/false);
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  const PoolId pool = NewUserPoolId();
  h.Begin(pool, RouteFilter::CurrentThread());
  void* block = h.Allocate(12 * kMiB, a);
  const uint64_t a_work = h.device->Enqueue(a);
  const uint64_t b_work = h.device->Enqueue(b);
  REQUIRE(h.allocator->RecordStream(block, b).ok());
  h.Free(block);
  h.End(pool);
  REQUIRE_FALSE(h.device->IsComplete(a, a_work));
  REQUIRE_FALSE(h.device->IsComplete(b, b_work));
  h.Release(pool);
  // The segment went back, and only after the device finished what was queued on both streams.
  CHECK(h.device->used_bytes() == 0);
  CHECK(h.device->IsComplete(a, a_work));
  CHECK(h.device->IsComplete(b, b_work));
}

TEST_CASE("reviving a pool whose references reached zero while blocks were live: same pool") {
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  PoolHarness h(expandable);
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  h.Begin(pool, RouteFilter::CurrentThread());
  void* old_block = h.Allocate(64 * kKiB, stream);
  h.End(pool);
  h.Release(pool);
  REQUIRE(h.Info(pool).released);
  REQUIRE(h.Info(pool).live_blocks == 1);
  const int64_t allocated_before = h.Stats(pool).allocated_bytes.current;

  // PyTorch trips an internal assert here; tidepool revives the pool.
  h.Begin(pool, RouteFilter::CurrentThread());
  PoolInfo info = h.Info(pool);
  CHECK(info.references == 1);
  CHECK(info.routes == 1);
  CHECK_FALSE(info.released);
  CHECK(info.live_blocks == 1);
  void* new_block = h.Allocate(64 * kKiB, stream);
  CHECK(h.PoolOf(new_block) == pool);
  CHECK(h.PoolOf(old_block) == pool);
  // One arena: the old block and the new one are counted together.
  const AllocatorStats stats = h.Stats(pool);
  CHECK(stats.active_blocks.current == 2);
  CHECK(stats.allocated_bytes.current == 2 * allocated_before);
  CHECK(h.Info(pool).live_blocks == 2);

  // Freeing the old block no longer ends the pool: it is alive, and keeps its cache.
  h.Free(old_block);
  h.Free(new_block);
  CHECK_FALSE(h.Info(pool).released);
  CHECK(h.Stats(pool).reserved_bytes.current > 0);
  void* cached = h.Allocate(64 * kKiB, stream);
  CHECK((cached == old_block || cached == new_block));
  h.Free(cached);
  h.End(pool);
  h.Release(pool);
  CHECK(h.device->used_bytes() == 0);
}

TEST_CASE("a pool that is gone serves again under the same id, with its statistics") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  {
    PoolScope scope(h.manager.get(), pool);
    h.Free(h.Allocate(kMiB, stream));
  }
  REQUIRE(h.Stats(pool).reserved_bytes.current == 0);
  REQUIRE(h.Stats(pool).allocated_bytes.peak > 0);
  {
    PoolScope scope(h.manager.get(), pool);
    CHECK(h.Info(pool).references == 1);
    CHECK_FALSE(h.Info(pool).released);
    // The same arena serves again: its statistics go on from where they were.
    const int64_t earlier_peak = h.Stats(pool).allocated_bytes.peak;
    CHECK(earlier_peak > 0);
    void* block = h.Allocate(kMiB, stream);
    CHECK(h.Stats(pool).allocated_bytes.added > earlier_peak);
    CHECK(h.PoolOf(block) == pool);
    CHECK(h.Stats(pool).active_blocks.current == 1);
    h.Free(block);
  }
  CHECK(h.device->used_bytes() == 0);
}

TEST_CASE("Trim, Stats and Snapshot of a pool see that pool only") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId p = NewUserPoolId();
  const PoolId q = NewUserPoolId();
  std::vector<void*> in_p, in_q, in_default;
  h.Begin(p, RouteFilter::CurrentThread());
  for (size_t size : {kKiB, 3 * kMiB, 5 * kKiB}) in_p.push_back(h.Allocate(size, stream));
  h.End(p);
  h.Begin(q, RouteFilter::Everyone());
  for (size_t size : {2 * kMiB, 7 * kKiB}) in_q.push_back(h.Allocate(size, stream));
  h.End(q);
  in_default.push_back(h.Allocate(9 * kKiB, stream));

  auto sum_sizes = [&](const std::vector<void*>& blocks) {
    int64_t sum = 0;
    for (void* ptr : blocks) sum += static_cast<int64_t>(*h.allocator->BlockSize(ptr));
    return sum;
  };
  CHECK(h.Stats(p).allocated_bytes.current == sum_sizes(in_p));
  CHECK(h.Stats(p).active_blocks.current == 3);
  CHECK(h.Stats(q).allocated_bytes.current == sum_sizes(in_q));
  CHECK(h.Stats(q).active_blocks.current == 2);
  CHECK(h.Stats(kDefaultPool).allocated_bytes.current == sum_sizes(in_default));
  CHECK(h.Stats(p).reserved_bytes.current + h.Stats(q).reserved_bytes.current +
            h.Stats(kDefaultPool).reserved_bytes.current ==
        static_cast<int64_t>(h.device->used_bytes()));

  const std::string p_label = absl::StrCat("\"pool\":\"pool ", p.ToString(), "\"");
  absl::StatusOr<std::string> snapshot = h.manager->Snapshot(p);
  REQUIRE(snapshot.ok());
  CHECK(Count(*snapshot, "\"pool\":") == Count(*snapshot, p_label));
  CHECK(Count(*snapshot, p_label) >= 1);
  CHECK(Count(*snapshot, "\"state\":\"allocated\"") == 3);
  for (void* ptr : in_p) {
    CHECK(Count(*snapshot, absl::StrCat("{\"address\":", reinterpret_cast<uintptr_t>(ptr), ",")) ==
          1);
  }
  for (void* ptr : in_q) {
    CHECK(Count(*snapshot, absl::StrCat("{\"address\":", reinterpret_cast<uintptr_t>(ptr), ",")) ==
          0);
  }

  // Trim p with its blocks freed: p holds nothing, q and the default pool keep their caches.
  for (void* ptr : in_p) h.Free(ptr);
  h.Free(in_q[1]);
  h.Free(in_default[0]);
  const int64_t q_reserved = h.Stats(q).reserved_bytes.current;
  const int64_t default_reserved = h.Stats(kDefaultPool).reserved_bytes.current;
  REQUIRE(h.Stats(p).reserved_bytes.current > 0);
  REQUIRE(h.manager->Trim(p).ok());
  CHECK(h.Stats(p).reserved_bytes.current == 0);
  CHECK(h.Stats(q).reserved_bytes.current == q_reserved);
  CHECK(h.Stats(kDefaultPool).reserved_bytes.current == default_reserved);
  // Trim changes memory, not references.
  CHECK(h.Info(p).references == 1);
  CHECK_FALSE(h.Info(p).released);
  // Trim of the default pool leaves q; Trim of q keeps its live block.
  REQUIRE(h.manager->Trim(kDefaultPool).ok());
  CHECK(h.Stats(kDefaultPool).reserved_bytes.current == 0);
  CHECK(h.Stats(q).reserved_bytes.current == q_reserved);
  REQUIRE(h.manager->Trim(q).ok());
  CHECK(h.Stats(q).reserved_bytes.current > 0);
  CHECK(h.Stats(q).reserved_bytes.current <= q_reserved);
  CHECK(h.Stats(q).active_blocks.current == 1);
  h.Free(in_q[0]);
  h.Release(p);
  h.Release(q);
  CHECK(h.device->used_bytes() == 0);
}

// Plain segments from the device, counted.
class CountingSource : public SegmentSource {
 public:
  explicit CountingSource(Device* device) : device_(device) {}
  absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) override {
    absl::StatusOr<uintptr_t> address = device_->AllocateSegment(bytes);
    if (address.ok()) ++allocations, held += bytes;
    return address;
  }
  absl::Status FreeSegment(uintptr_t address, size_t bytes) override {
    ++frees;
    held -= bytes;
    return device_->FreeSegment(address, bytes);
  }
  std::string name() const override { return "counting"; }

  int allocations = 0;
  int frees = 0;
  size_t held = 0;

 private:
  Device* const device_;
};

TEST_CASE("a pool's options are those of the Begin that created it") {
  PoolHarness h;
  Stream stream = h.NewStream();
  CountingSource source(h.device.get());
  const PoolId pool = NewUserPoolId();
  PoolOptions options;
  options.source = &source;
  options.shares_free_memory = false;
  h.manager->Begin(pool, RouteFilter::CurrentThread(), options).IgnoreError();
  REQUIRE(h.Info(pool).references == 1);
  void* block = h.Allocate(5 * kMiB, stream);
  CHECK(source.allocations == 1);
  CHECK(source.held == h.device->used_bytes());
  // A nested Begin with other options changes nothing about the pool.
  REQUIRE(h.manager->Begin(pool, RouteFilter::CurrentThread(), PoolOptions{}).ok());
  void* more = h.Allocate(30 * kMiB, stream);
  CHECK(source.allocations == 2);
  h.End(pool);
  h.End(pool);
  h.Free(block);
  h.Free(more);

  // Not shared: EmptyCache leaves its free memory; Trim returns it.
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(source.held > 0);
  CHECK(source.frees == 0);
  REQUIRE(h.manager->Trim(pool).ok());
  CHECK(source.held == 0);
  CHECK(source.frees == 2);
  h.Release(pool);
  h.Release(pool);
  CHECK(h.device->used_bytes() == 0);
}

TEST_CASE("Create makes a pool with one reference and no route; scopes on it keep its cache") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  REQUIRE(h.manager->Create(pool, PoolOptions{}).ok());
  PoolInfo info = h.Info(pool);
  CHECK(info.references == 1);
  CHECK(info.routes == 0);
  CHECK_FALSE(info.released);
  CHECK(h.RouteOf(stream) == kDefaultPool);

  void* first = nullptr;
  {
    PoolScope scope(h.manager.get(), pool);
    CHECK(h.Info(pool).references == 2);
    first = h.Allocate(64 * kKiB, stream);
    h.Free(first);
  }
  // The held reference keeps the pool and its cache: a scope cycle costs no device work.
  CHECK(h.Info(pool).references == 1);
  CHECK_FALSE(h.Info(pool).released);
  const size_t held = h.device->used_bytes();
  CHECK(held > 0);
  const int64_t syncs = h.device->synchronizations();
  for (int i = 0; i < 10; ++i) {
    PoolScope scope(h.manager.get(), pool);
    void* block = h.Allocate(64 * kKiB, stream);
    CHECK(block == first);
    h.Free(block);
  }
  CHECK(h.device->synchronizations() == syncs);
  CHECK(h.device->used_bytes() == held);

  h.Release(pool);
  CHECK(h.Info(pool).released);
  CHECK(h.device->used_bytes() == 0);
}

TEST_CASE("user ids are {0, n} and graph ids {n, 0}, from two counters, unique across threads") {
  const PoolId user = NewUserPoolId();
  const PoolId graph = NewGraphPoolId();
  CHECK(user.first == 0);
  CHECK(user.second > 0);
  CHECK(graph.first > 0);
  CHECK(graph.second == 0);
  CHECK_FALSE(user.is_default());
  CHECK_FALSE(graph.is_default());
  CHECK(kDefaultPool.is_default());
  CHECK(NewUserPoolId().second > user.second);
  CHECK(NewGraphPoolId().first > graph.first);

  constexpr int kThreads = 4;
  constexpr int kEach = 2000;
  std::vector<std::vector<PoolId>> made(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&made, t] {
      for (int i = 0; i < kEach; ++i) {
        made[t].push_back(i % 2 == 0 ? NewUserPoolId() : NewGraphPoolId());
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  std::set<std::pair<uint64_t, uint64_t>> seen;
  for (const auto& ids : made) {
    for (const PoolId& id : ids) {
      CHECK(((id.first == 0) != (id.second == 0)));
      seen.emplace(id.first, id.second);
    }
  }
  CHECK(seen.size() == kThreads * kEach);

  // Both kinds are pools like any other, and ToString names them as PyTorch's pair would.
  PoolHarness h;
  Stream stream = h.NewStream();
  for (PoolId id : {user, graph}) {
    PoolScope scope(h.manager.get(), id);
    void* block = h.Allocate(kKiB, stream);
    CHECK(h.PoolOf(block) == id);
    h.Free(block);
  }
  CHECK(PoolId{3, 0}.ToString() == "{3,0}");
  CHECK(PoolId{0, 7}.ToString() == "{0,7}");
}

TEST_CASE("a thread that exits while redirected: its routes end, its references are released") {
  PoolHarness h;
  Stream main_stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  const PoolId held = NewUserPoolId();  // the main thread holds a reference to this one too
  h.Begin(held, RouteFilter::Everyone());
  h.End(held);
  // Catch's assertions are not for other threads: the worker records, the main thread checks.
  std::vector<void*> blocks;
  std::vector<absl::Status> statuses;
  PoolId main_route_meanwhile;
  int64_t pool_references_meanwhile = -1;
  int64_t held_references_meanwhile = -1;
  std::thread worker([&] {
    Stream stream = h.device->CreateStream().value_or(nullptr);
    auto allocate = [&](size_t bytes) {
      absl::StatusOr<void*> ptr = h.manager->Allocate(bytes, stream);
      statuses.push_back(ptr.status());
      if (ptr.ok()) blocks.push_back(*ptr);
    };
    for (int depth = 0; depth < 2; ++depth) {
      statuses.push_back(h.manager->Begin(pool, RouteFilter::CurrentThread()));
      allocate(3 * kMiB);
    }
    statuses.push_back(h.manager->Begin(held, RouteFilter::CurrentThread()));
    allocate(kKiB);
    statuses.push_back(h.manager->Begin(kDefaultPool, RouteFilter::CurrentThread()));
    allocate(kKiB);
    // Meanwhile, the main thread's allocations are not routed.
    main_route_meanwhile = h.manager->RouteOf(main_stream).value_or(pool);
    pool_references_meanwhile = h.manager->Info(pool).value_or(PoolInfo{}).references;
    held_references_meanwhile = h.manager->Info(held).value_or(PoolInfo{}).references;
    // Exits with four routes open.
  });
  worker.join();
  for (const absl::Status& status : statuses) CHECK(status.ToString() == "OK");
  CHECK(main_route_meanwhile == kDefaultPool);
  CHECK(pool_references_meanwhile == 2);
  CHECK(held_references_meanwhile == 2);
  REQUIRE(blocks.size() == 4);
  CHECK(h.PoolOf(blocks[0]) == pool);
  CHECK(h.PoolOf(blocks[1]) == pool);
  CHECK(h.PoolOf(blocks[2]) == held);
  CHECK(h.PoolOf(blocks[3]) == kDefaultPool);

  PoolInfo info = h.Info(pool);
  CHECK(info.routes == 0);
  CHECK(info.references == 0);
  CHECK(info.released);
  CHECK(info.live_blocks == 2);
  info = h.Info(held);
  CHECK(info.routes == 0);
  CHECK(info.references == 1);  // the main thread's
  CHECK_FALSE(info.released);
  CHECK(h.Info(kDefaultPool).routes == 0);
  CHECK(h.RouteOf(main_stream) == kDefaultPool);

  for (void* ptr : blocks) h.Free(ptr);
  CHECK(h.Info(pool).live_blocks == 0);
  CHECK(h.Stats(pool).reserved_bytes.current == 0);  // gone with its last block
  h.Release(held);
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.device->used_bytes() == 0);
  CHECK(h.device->live_segments() == 0);
}

TEST_CASE("threads started inside a scope are not routed (as in PyTorch)") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  PoolScope scope(h.manager.get(), pool);
  CHECK(h.RouteOf(stream) == pool);
  PoolId seen = pool;
  void* block = nullptr;
  std::thread([&] {
    seen = h.manager->RouteOf(stream).value_or(pool);
    block = h.manager->Allocate(kKiB, stream).value_or(nullptr);
  }).join();
  CHECK(seen == kDefaultPool);
  REQUIRE(block != nullptr);
  CHECK(h.PoolOf(block) == kDefaultPool);
  h.Free(block);
}

}  // namespace
}  // namespace tidepool
