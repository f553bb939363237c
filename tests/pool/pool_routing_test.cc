// Tests of routing (pool/pool_manager.h, docs/pools.md): which pool each allocation goes to, and
// where each block goes back to.
//
//   * Begin creates the pool and routes; End pops the entry and keeps the reference;
//   * a block returns to its own pool whatever routing is active when it is freed;
//   * re-entering the same pool on the same thread nests (Begin and PoolScope);
//   * the table is searched newest first across filter kinds (current thread, everyone, stream,
//     capture), and a route to the default pool is a route like any other;
//   * a stream route matches by stream id; a capture route matches only streams in that capture;
//   * routing never changes reuse rules: a block freed with a pending RecordStream waits for the
//     other stream's work inside a routed region exactly as outside, and out-of-memory recovery
//     still returns other pools' cache.
// Every decision is read twice: RouteOf before the allocation, PoolOf of the block after it.
#include <catch2/catch.hpp>

#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
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

TEST_CASE("Begin creates the pool, takes a reference, and routes the calling thread to it") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  // Unknown before.
  CHECK(absl::IsNotFound(h.manager->Info(pool).status()));
  CHECK(h.RouteOf(stream) == kDefaultPool);

  h.Begin(pool, RouteFilter::CurrentThread());
  PoolInfo info = h.Info(pool);
  CHECK(info.references == 1);
  CHECK(info.routes == 1);
  CHECK(info.live_blocks == 0);
  CHECK_FALSE(info.released);
  CHECK(h.RouteOf(stream) == pool);

  void* block = h.Allocate(64 * kKiB, stream);
  CHECK(h.PoolOf(block) == pool);
  CHECK(h.Info(pool).live_blocks == 1);
  CHECK(h.Stats(pool).active_blocks.current == 1);
  CHECK(h.Stats(kDefaultPool).active_blocks.current == 0);
  CHECK(h.Stats(pool).reserved_bytes.current > 0);
  CHECK(h.Stats(kDefaultPool).reserved_bytes.current == 0);

  h.Free(block);
  h.End(pool);
  h.Release(pool);
}

TEST_CASE("End pops the routing entry but keeps the reference") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();
  h.Begin(pool, RouteFilter::CurrentThread());
  void* inside = h.Allocate(4 * kKiB, stream);
  const int64_t reserved = h.Stats(pool).reserved_bytes.current;

  h.End(pool);
  PoolInfo info = h.Info(pool);
  CHECK(info.references == 1);
  CHECK(info.routes == 0);
  CHECK_FALSE(info.released);
  CHECK(h.RouteOf(stream) == kDefaultPool);
  void* outside = h.Allocate(4 * kKiB, stream);
  CHECK(h.PoolOf(outside) == kDefaultPool);

  // The pool keeps its cache: nothing went back when the route ended.
  h.Free(inside);
  CHECK(h.Stats(pool).reserved_bytes.current == reserved);
  // And a later Begin adds to the reference that stayed.
  h.Begin(pool, RouteFilter::CurrentThread());
  CHECK(h.Info(pool).references == 2);
  void* again = h.Allocate(4 * kKiB, stream);
  CHECK(again == inside);  // the pool's own cached block
  h.Free(again);
  h.End(pool);
  h.Release(pool);
  h.Release(pool);
  h.Free(outside);
}

TEST_CASE("a block returns to its own pool whatever routing is active when it is freed") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId p = NewUserPoolId();
  const PoolId q = NewUserPoolId();
  h.Begin(p, RouteFilter::CurrentThread());
  void* from_p = h.Allocate(256 * kKiB, stream);
  h.End(p);
  void* from_default = h.Allocate(256 * kKiB, stream);
  h.Begin(q, RouteFilter::Everyone());
  void* from_q = h.Allocate(256 * kKiB, stream);
  CHECK(h.PoolOf(from_p) == p);
  CHECK(h.PoolOf(from_default) == kDefaultPool);
  CHECK(h.PoolOf(from_q) == q);

  // Free all three while everything is routed to q.
  const AllocatorStats q_before = h.Stats(q);
  h.Free(from_p);
  h.Free(from_default);
  CHECK(h.Stats(p).active_blocks.current == 0);
  CHECK(h.Stats(kDefaultPool).active_blocks.current == 0);
  CHECK(h.Stats(q).active_blocks.current == q_before.active_blocks.current);
  CHECK(h.Stats(q).allocated_bytes.current == q_before.allocated_bytes.current);
  CHECK(h.Info(q).live_blocks == 1);

  // The freed blocks sit in their own pools' caches: q does not hand them out, p and the default
  // pool do.
  void* in_q = h.Allocate(256 * kKiB, stream);
  CHECK(in_q != from_p);
  CHECK(in_q != from_default);
  h.End(q);
  void* in_default = h.Allocate(256 * kKiB, stream);
  CHECK(in_default == from_default);
  h.Begin(p, RouteFilter::CurrentThread());
  void* in_p = h.Allocate(256 * kKiB, stream);
  CHECK(in_p == from_p);

  // And a block of p freed while the thread is routed to the default pool goes back to p.
  h.Begin(kDefaultPool, RouteFilter::CurrentThread());
  h.Free(in_p);
  CHECK(h.Stats(p).active_blocks.current == 0);
  h.End(kDefaultPool);

  for (void* ptr : {from_q, in_q, in_default}) h.Free(ptr);
  h.End(p);
  h.Release(p);
  h.Release(q);
}

TEST_CASE("re-entering the same pool on the same thread nests: references and routes count") {
  PoolHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewUserPoolId();

  SECTION("Begin / End") {
    for (int depth = 1; depth <= 3; ++depth) {
      h.Begin(pool, RouteFilter::CurrentThread());
      CHECK(h.Info(pool).references == depth);
      CHECK(h.Info(pool).routes == depth);
      CHECK(h.RouteOf(stream) == pool);
    }
    for (int depth = 3; depth >= 1; --depth) {
      CHECK(h.RouteOf(stream) == pool);  // still inside
      h.End(pool);
      CHECK(h.Info(pool).routes == depth - 1);
      CHECK(h.Info(pool).references == 3);  // End keeps references
    }
    CHECK(h.RouteOf(stream) == kDefaultPool);
    for (int i = 0; i < 3; ++i) h.Release(pool);
    CHECK(h.Info(pool).released);
  }

  SECTION("PoolScope, nested directly and through another pool") {
    const PoolId other = NewUserPoolId();
    std::vector<void*> blocks;
    {
      PoolScope outer(h.manager.get(), pool);
      REQUIRE(outer.status().ok());
      blocks.push_back(h.Allocate(kKiB, stream));
      {
        PoolScope inner(h.manager.get(), pool);
        REQUIRE(inner.status().ok());
        CHECK(h.Info(pool).references == 2);
        CHECK(h.Info(pool).routes == 2);
        blocks.push_back(h.Allocate(kKiB, stream));
        {
          PoolScope elsewhere(h.manager.get(), other);
          CHECK(h.RouteOf(stream) == other);
          {
            PoolScope innermost(h.manager.get(), pool);
            CHECK(h.Info(pool).references == 3);
            blocks.push_back(h.Allocate(kKiB, stream));
          }
          CHECK(h.RouteOf(stream) == other);
        }
        CHECK(h.RouteOf(stream) == pool);
      }
      // The inner scopes' exit left the outer one routed, with its own reference.
      CHECK(h.Info(pool).references == 1);
      CHECK(h.Info(pool).routes == 1);
      CHECK_FALSE(h.Info(pool).released);
      CHECK(h.RouteOf(stream) == pool);
      blocks.push_back(h.Allocate(kKiB, stream));
    }
    CHECK(h.RouteOf(stream) == kDefaultPool);
    const PoolInfo info = h.Info(pool);
    CHECK(info.references == 0);
    CHECK(info.routes == 0);
    CHECK(info.released);
    CHECK(info.live_blocks == 4);
    for (void* ptr : blocks) {
      CHECK(h.PoolOf(ptr) == pool);
      h.Free(ptr);
    }
    CHECK(h.Info(other).released);
  }
}

TEST_CASE("routes are searched newest first, across filter kinds") {
  PoolHarness h;
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  const PoolId thread_pool = NewUserPoolId();
  const PoolId everyone_pool = NewUserPoolId();
  const PoolId stream_pool = NewUserPoolId();

  SECTION("a later everyone route overrides an earlier thread route, and its End restores it") {
    h.Begin(thread_pool, RouteFilter::CurrentThread());
    h.Begin(everyone_pool, RouteFilter::Everyone());
    CHECK(h.RouteOf(a) == everyone_pool);
    void* ptr = h.Allocate(kKiB, a);
    CHECK(h.PoolOf(ptr) == everyone_pool);
    h.End(everyone_pool);
    CHECK(h.RouteOf(a) == thread_pool);
    h.Free(ptr);
    h.End(thread_pool);
  }
  SECTION("a later thread route overrides an earlier everyone route, and its End restores it") {
    h.Begin(everyone_pool, RouteFilter::Everyone());
    h.Begin(thread_pool, RouteFilter::CurrentThread());
    CHECK(h.RouteOf(a) == thread_pool);
    h.End(thread_pool);
    CHECK(h.RouteOf(a) == everyone_pool);
    h.End(everyone_pool);
  }
  SECTION("a stream route wins for its stream only while it is the newest match") {
    h.Begin(thread_pool, RouteFilter::CurrentThread());
    h.Begin(stream_pool, RouteFilter::OnStream(h.IdOf(b)));
    CHECK(h.RouteOf(a) == thread_pool);
    CHECK(h.RouteOf(b) == stream_pool);
    h.Begin(everyone_pool, RouteFilter::Everyone());
    CHECK(h.RouteOf(a) == everyone_pool);
    CHECK(h.RouteOf(b) == everyone_pool);
    h.Begin(thread_pool, RouteFilter::CurrentThread());
    CHECK(h.RouteOf(b) == thread_pool);
    h.End(thread_pool);  // the newest thread route to it
    CHECK(h.RouteOf(b) == everyone_pool);
    h.End(everyone_pool);
    CHECK(h.RouteOf(a) == thread_pool);
    CHECK(h.RouteOf(b) == stream_pool);
    h.End(stream_pool);
    CHECK(h.RouteOf(b) == thread_pool);
    h.End(thread_pool);
    CHECK(h.RouteOf(b) == kDefaultPool);
  }
  SECTION("a route to the default pool is a route like any other") {
    h.Begin(everyone_pool, RouteFilter::Everyone());
    h.Begin(kDefaultPool, RouteFilter::CurrentThread());
    CHECK(h.Info(kDefaultPool).routes == 1);
    CHECK(h.Info(kDefaultPool).references == 0);  // the default pool is not counted
    CHECK(h.RouteOf(a) == kDefaultPool);
    void* ptr = h.Allocate(kKiB, a);
    CHECK(h.PoolOf(ptr) == kDefaultPool);
    h.End(kDefaultPool);
    CHECK(h.Info(kDefaultPool).routes == 0);
    CHECK(h.RouteOf(a) == everyone_pool);
    {
      // The same through a scope, which then ends the route and releases nothing.
      PoolScope scope(h.manager.get(), kDefaultPool);
      REQUIRE(scope.status().ok());
      CHECK(h.RouteOf(a) == kDefaultPool);
      CHECK(h.Info(kDefaultPool).routes == 1);
    }
    CHECK(h.Info(kDefaultPool).routes == 0);
    CHECK(h.Info(everyone_pool).references == 1);
    CHECK(h.RouteOf(a) == everyone_pool);
    h.Free(ptr);
    h.End(everyone_pool);
  }
  SECTION("End of a pool routed twice pops this thread's own route, then the newest other") {
    h.Begin(everyone_pool, RouteFilter::Everyone());
    h.Begin(thread_pool, RouteFilter::CurrentThread());
    h.Begin(everyone_pool, RouteFilter::OnStream(h.IdOf(a)));
    h.Begin(everyone_pool, RouteFilter::CurrentThread());
    CHECK(h.RouteOf(b) == everyone_pool);
    h.End(everyone_pool);  // the thread route, though the stream route to it is older
    CHECK(h.RouteOf(a) == everyone_pool);  // the stream route
    CHECK(h.RouteOf(b) == thread_pool);
    h.End(everyone_pool);  // now the stream route, the newest of the others
    CHECK(h.RouteOf(a) == thread_pool);
    h.End(thread_pool);
    CHECK(h.RouteOf(a) == everyone_pool);  // the everyone route still stands
    h.End(everyone_pool);
    CHECK(h.RouteOf(a) == kDefaultPool);
  }
  for (PoolId pool : {thread_pool, everyone_pool, stream_pool}) {
    if (!h.manager->Info(pool).ok()) continue;
    const PoolInfo info = h.Info(pool);
    CHECK(info.routes == 0);
    for (int64_t i = 0; i < info.references; ++i) h.Release(pool);
  }
}

TEST_CASE("a stream route matches by stream id: that stream's allocations, from any thread") {
  PoolHarness h;
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  const PoolId pool = NewUserPoolId();
  h.Begin(pool, RouteFilter::OnStream(h.IdOf(b)));
  CHECK(h.RouteOf(a) == kDefaultPool);
  CHECK(h.RouteOf(b) == pool);
  void* on_a = h.Allocate(kMiB, a);
  void* on_b = h.Allocate(kMiB, b);
  CHECK(h.PoolOf(on_a) == kDefaultPool);
  CHECK(h.PoolOf(on_b) == pool);
  // Another thread's allocations on b are routed too; on a, not.
  void* from_thread_b = nullptr;
  void* from_thread_a = nullptr;
  std::thread([&] {
    from_thread_b = h.manager->Allocate(kMiB, b).value_or(nullptr);
    from_thread_a = h.manager->Allocate(kMiB, a).value_or(nullptr);
  }).join();
  REQUIRE(from_thread_a != nullptr);
  REQUIRE(from_thread_b != nullptr);
  CHECK(h.PoolOf(from_thread_b) == pool);
  CHECK(h.PoolOf(from_thread_a) == kDefaultPool);
  h.Free(from_thread_a);
  h.Free(from_thread_b);

  // Another stream never matches, even once b is gone: the route names b's id, not a handle.
  REQUIRE(h.device->DestroyStream(b).ok());
  Stream c = h.NewStream();
  CHECK(h.IdOf(c) != h.IdOf(a));
  CHECK(h.RouteOf(c) == kDefaultPool);
  // A route for a stream id nobody has is harmless.
  h.End(pool);
  h.Begin(pool, RouteFilter::OnStream(987654321));
  CHECK(h.RouteOf(a) == kDefaultPool);
  CHECK(h.RouteOf(c) == kDefaultPool);
  h.End(pool);
  h.Free(on_a);
  h.Free(on_b);
  h.Release(pool);
  h.Release(pool);
}

TEST_CASE("a capture route matches only allocations on streams taking part in that capture") {
  PoolHarness h;
  Stream capturing = h.NewStream();
  Stream joined = h.NewStream();
  Stream outside = h.NewStream();
  Stream other_capture = h.NewStream();
  const PoolId pool = NewUserPoolId();

  // Captures are marked on the allocator, as graph::Capture does (a capturing stream must not be
  // asked for its device id).
  h.allocator->NoteCaptureBegin();
  h.allocator->NoteCaptureBegin();
  const uint64_t capture = h.device->BeginCapture(capturing).value();
  h.device->JoinCapture(joined, capturing);
  const uint64_t second = h.device->BeginCapture(other_capture).value();
  REQUIRE(capture != second);
  h.Begin(pool, RouteFilter::InCapture(capture));

  CHECK(h.RouteOf(capturing) == pool);
  CHECK(h.RouteOf(joined) == pool);
  CHECK(h.RouteOf(outside) == kDefaultPool);
  CHECK(h.RouteOf(other_capture) == kDefaultPool);
  std::vector<void*> in_capture = {h.Allocate(kKiB, capturing), h.Allocate(kKiB, joined)};
  void* not_in_capture = h.Allocate(kKiB, outside);
  for (void* ptr : in_capture) CHECK(h.PoolOf(ptr) == pool);
  CHECK(h.PoolOf(not_in_capture) == kDefaultPool);

  // A thread route begun later wins over the capture route, and ending it gives the capture back.
  const PoolId mine = NewUserPoolId();
  h.Begin(mine, RouteFilter::CurrentThread());
  CHECK(h.RouteOf(capturing) == mine);
  h.End(mine);
  CHECK(h.RouteOf(capturing) == pool);

  // Once the capture ends, its streams are ordinary streams again.
  REQUIRE(h.device->DestroyGraph(h.device->EndCapture(capturing).value()).ok());
  CHECK(h.RouteOf(capturing) == kDefaultPool);
  CHECK(h.RouteOf(joined) == kDefaultPool);
  REQUIRE(h.device->DestroyGraph(h.device->EndCapture(other_capture).value()).ok());
  REQUIRE(h.allocator->NoteCaptureEnd().ok());
  REQUIRE(h.allocator->NoteCaptureEnd().ok());
  CHECK(h.device->capture_violations() == 0);
  h.End(pool);
  for (void* ptr : in_capture) h.Free(ptr);
  h.Free(not_in_capture);
  h.Release(pool);
  h.Release(mine);
}

// How the test is routed while it checks reuse.
enum class Routing { kNone, kThread, kEveryone, kStream, kDefaultRoute };

const char* Name(Routing routing) {
  switch (routing) {
    case Routing::kNone: return "no routing";
    case Routing::kThread: return "a current-thread route";
    case Routing::kEveryone: return "an everyone route";
    case Routing::kStream: return "a stream route";
    case Routing::kDefaultRoute: return "a route to the default pool, another pool routed below";
  }
  return "?";
}

TEST_CASE("routing never changes reuse rules: RecordStream waits for the other stream's event") {
  const bool expandable = GENERATE(true, false);
  const Routing routing = GENERATE(Routing::kNone, Routing::kThread, Routing::kEveryone,
                                   Routing::kStream, Routing::kDefaultRoute);
  const size_t size = GENERATE(4 * kKiB, 3 * kMiB);
  INFO("expandable_segments=" << expandable << ", " << Name(routing) << ", size " << size);
  PoolHarness h(expandable);
  Stream a = h.NewStream();
  Stream b = h.NewStream();
  const PoolId pool = NewUserPoolId();
  PoolId expected = pool;
  switch (routing) {
    case Routing::kNone:
      expected = kDefaultPool;
      break;
    case Routing::kThread:
      h.Begin(pool, RouteFilter::CurrentThread());
      break;
    case Routing::kEveryone:
      h.Begin(pool, RouteFilter::Everyone());
      break;
    case Routing::kStream:
      h.Begin(pool, RouteFilter::OnStream(h.IdOf(a)));
      break;
    case Routing::kDefaultRoute:
      h.Begin(pool, RouteFilter::Everyone());
      h.Begin(kDefaultPool, RouteFilter::CurrentThread());
      expected = kDefaultPool;
      break;
  }
  const int64_t syncs_before = h.device->synchronizations();

  void* block = h.Allocate(size, a);
  REQUIRE(h.PoolOf(block) == expected);
  h.device->Enqueue(b);
  const uint64_t b_at_free = h.device->Enqueue(b);  // B's work that reads the block
  REQUIRE(h.allocator->RecordStream(block, b).ok());
  h.Free(block);
  h.device->Enqueue(b);  // later work on B, which does not concern the block

  // Same stream, same size, same pool: without the RecordStream this would be the same block.
  std::vector<void*> interim;
  interim.push_back(h.Allocate(size, a));
  CHECK(interim.back() != block);
  h.device->Complete(b, b_at_free - 1);
  interim.push_back(h.Allocate(size, a));
  CHECK(interim.back() != block);
  h.device->Complete(b, b_at_free);
  void* reused = h.Allocate(size, a);
  CHECK(reused == block);
  CHECK(h.PoolOf(reused) == expected);
  // Waiting was done by watching the event, never by synchronizing.
  CHECK(h.device->synchronizations() == syncs_before);

  // And a plain free is reusable at once in stream order, routed or not.
  h.Free(reused);
  CHECK(h.Allocate(size, a) == block);
  h.Free(block);
  for (void* ptr : interim) h.Free(ptr);
  if (routing == Routing::kDefaultRoute) h.End(kDefaultPool);
  if (routing != Routing::kNone) {
    h.End(pool);
    h.Release(pool);
  }
}

TEST_CASE("routing never turns off out-of-memory recovery: other pools' cache is returned") {
  const bool expandable = GENERATE(true, false);
  INFO("expandable_segments=" << expandable);
  PoolHarness h(expandable, 64 * kMiB);
  Stream stream = h.NewStream();
  // The default pool caches most of the device, free.
  std::vector<void*> cached;
  for (int i = 0; i < 4; ++i) cached.push_back(h.Allocate(12 * kMiB, stream));
  for (void* ptr : cached) h.Free(ptr);
  REQUIRE(h.Stats(kDefaultPool).reserved_bytes.current >= static_cast<int64_t>(48 * kMiB));

  const PoolId pool = NewUserPoolId();
  PoolScope scope(h.manager.get(), pool);
  void* big = h.Allocate(40 * kMiB, stream);
  CHECK(h.PoolOf(big) == pool);
  CHECK(h.Stats(kDefaultPool).reserved_bytes.current < static_cast<int64_t>(48 * kMiB));
  CHECK(h.device->used_bytes() <= 64 * kMiB);
  // Plain segments: growth failed, the cache went back, growth was retried (PyTorch turns this
  // off while any pool is routed). Expandable: growth took the default pool's free chunks.
  if (!expandable) CHECK(h.Stats(pool).retries == 1);
  h.Free(big);
}

}  // namespace
}  // namespace tidepool
