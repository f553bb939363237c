// The rules of graph capture (graph/capture.h, docs/graphs.md), one TEST_CASE per rule, on the
// simulated device. The simulated device counts every event query or synchronization made while
// a capture runs (a real driver would invalidate the capture), and every test here requires that
// count to stay at zero.
#include <catch2/catch.hpp>

#include <atomic>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/simulated_device.h"
#include "graph/capture.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"
#include "tests/pool/pool_harness.h"

namespace tidepool {
namespace {

using graph::Capture;
using graph::CaptureOptions;
using graph::Graph;
using graph::SharedPool;
using testing::PoolHarness;

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

// The harness with helpers for captures; every helper REQUIREs success.
struct CaptureHarness : PoolHarness {
  explicit CaptureHarness(bool expandable = true) : PoolHarness(expandable) {}
  using PoolHarness::Begin;
  using PoolHarness::End;

  Capture Begin(Stream stream, CaptureOptions options = {}) {
    absl::StatusOr<Capture> capture =
        Capture::Begin(device.get(), manager.get(), stream, options);
    INFO("Capture::Begin: " << capture.status().ToString());
    REQUIRE(capture.ok());
    return *std::move(capture);
  }
  Graph End(Capture& capture) {
    absl::StatusOr<Graph> graph = capture.End();
    INFO("Capture::End: " << graph.status().ToString());
    REQUIRE(graph.ok());
    return *std::move(graph);
  }
  int64_t ReservedIn(PoolId pool) { return Stats(pool).reserved_bytes.current; }

  ~CaptureHarness() { CHECK(device->capture_violations() == 0); }
};

TEST_CASE("allocations on a capturing stream and on streams joined to it go to the capture's pool") {
  CaptureHarness h;
  Stream capturing = h.NewStream();
  Stream joined = h.NewStream();
  Stream outside = h.NewStream();
  Capture capture = h.Begin(capturing);
  h.device->JoinCapture(joined, capturing);
  const PoolId pool = capture.pool();
  CHECK(pool.first != 0);  // a graph pool id
  CHECK(h.allocator->captures_underway() == 1);

  void* a = h.Allocate(kKiB, capturing);
  void* b = h.Allocate(3 * kMiB, joined);
  void* c = h.Allocate(kKiB, outside);
  CHECK(h.PoolOf(a) == pool);
  CHECK(h.PoolOf(b) == pool);
  CHECK(h.PoolOf(c) == kDefaultPool);
  CHECK(h.Info(pool).references == 1);
  CHECK(h.Info(pool).routes == 1);

  h.Free(a);
  h.Free(b);
  Graph graph = h.End(capture);
  CHECK(h.allocator->captures_underway() == 0);
  CHECK(h.RouteOf(capturing) == kDefaultPool);
  CHECK(graph.pool() == pool);
  CHECK(h.Info(pool).references == 1);  // now the graph's
  CHECK(h.Info(pool).routes == 0);
  h.Free(c);
  REQUIRE(graph.Reset().ok());
  CHECK(h.Info(pool).released);
  CHECK(h.device->live_graphs() == 0);
  h.RequireClean();
}

TEST_CASE("nothing queries an event during capture, even with frees pending from before it") {
  CaptureHarness h;
  Stream mine = h.NewStream();
  Stream other = h.NewStream();
  // A block freed before the capture after use on another stream: its event is pending.
  void* used_elsewhere = h.Allocate(kKiB, mine);
  REQUIRE(h.allocator->RecordStream(used_elsewhere, other).ok());
  h.device->Enqueue(other);
  h.Free(used_elsewhere);

  Capture capture = h.Begin(mine);
  // Allocations in the capture and outside it (the default pool's shard of `mine` holds the
  // pending free) would harvest events outside a capture.
  std::vector<void*> blocks;
  for (int i = 0; i < 8; ++i) blocks.push_back(h.Allocate(kKiB, mine));
  REQUIRE(h.manager->End(capture.pool(), RouteFilter::InCapture(capture.capture_id())).ok());
  REQUIRE(h.manager->Begin(capture.pool(), RouteFilter::InCapture(capture.capture_id())).ok());
  REQUIRE(h.manager->Release(capture.pool()).ok());  // the extra Begin's reference
  for (int i = 0; i < 8; ++i) {
    absl::StatusOr<void*> outside = h.allocator->Allocate(kKiB, mine);  // default pool, same stream
    REQUIRE(outside.ok());
    blocks.push_back(*outside);
  }
  CHECK(h.device->capture_violations() == 0);
  for (void* block : blocks) h.Free(block);
  Graph graph = h.End(capture);
  h.device->CompleteAll();
  REQUIRE(graph.Reset().ok());
  h.RequireClean();
}

TEST_CASE("a block freed in capture after use on another stream is deferred until the capture "
          "ends") {
  CaptureHarness h;
  Stream capturing = h.NewStream();
  Stream joined = h.NewStream();
  Capture capture = h.Begin(capturing);
  h.device->JoinCapture(joined, capturing);
  const int64_t events_before = h.device->live_events();

  void* shared = h.Allocate(64 * kKiB, capturing);
  REQUIRE(h.allocator->RecordStream(shared, joined).ok());
  h.Free(shared);
  // No event was recorded for it, and it is not reusable inside the capture.
  CHECK(h.device->live_events() == events_before);
  void* next = h.Allocate(64 * kKiB, capturing);
  CHECK(next != shared);
  CHECK(h.PoolOf(next) == capture.pool());
  h.Free(next);
  CHECK(h.allocator->SnapshotJson().find("awaiting_events") != std::string::npos);

  const int64_t synchronizations = h.device->synchronizations();
  Graph graph = h.End(capture);
  // Free once the capture is over, with no event and one device synchronization: the joined
  // stream may still run work queued before it joined (the next test), and its handle is never
  // touched again (the program may have destroyed it).
  CHECK(h.device->live_events() == events_before);
  CHECK(h.device->synchronizations() == synchronizations + 1);
  CHECK(h.allocator->SnapshotJson().find("awaiting_events") == std::string::npos);
  Capture next_capture = h.Begin(capturing, CaptureOptions{graph.pool()});
  CHECK(h.allocator->SnapshotJson().find("awaiting_events") == std::string::npos);
  void* first = h.Allocate(64 * kKiB, capturing);
  void* second = h.Allocate(64 * kKiB, capturing);
  CHECK((first == shared || second == shared));
  h.Free(first);
  h.Free(second);
  Graph next_graph = h.End(next_capture);
  REQUIRE(graph.Reset().ok());
  REQUIRE(next_graph.Reset().ok());
  h.RequireClean();
}

TEST_CASE("a block used on a stream that then joined a capture waits for that stream's earlier "
          "work") {
  // The hole the pool differential test found (seed 20240708): a use recorded while its stream
  // is capturing can name work queued on that stream before it began capturing, which the device
  // is still running. Releasing the block at the end of the capture without waiting for that
  // work would hand it out under it.
  CaptureHarness h;
  Stream capturing = h.NewStream();
  Stream side = h.NewStream();
  Stream other = h.NewStream();
  void* block = h.Allocate(64 * kKiB, other);
  const uint64_t earlier_work = h.device->Enqueue(side);  // reads `block`, still running
  Capture capture = h.Begin(capturing);
  h.device->JoinCapture(side, capturing);
  REQUIRE(h.allocator->RecordStream(block, side).ok());
  h.Free(block);
  Graph graph = h.End(capture);
  // Whatever comes back for `other` now, the earlier work on `side` is over before it.
  void* again = h.Allocate(64 * kKiB, other);
  CHECK((again != block || h.device->IsComplete(side, earlier_work)));
  CHECK(h.device->IsComplete(side, earlier_work));
  h.Free(again);
  h.device->CompleteAll();
  REQUIRE(graph.Reset().ok());
  h.RequireClean();
}

TEST_CASE("a block freed in capture without cross-stream use is reused in stream order") {
  CaptureHarness h;
  Stream capturing = h.NewStream();
  Capture capture = h.Begin(capturing);
  void* first = h.Allocate(128 * kKiB, capturing);
  h.Free(first);
  void* second = h.Allocate(128 * kKiB, capturing);
  CHECK(second == first);
  void* small = h.Allocate(512, capturing);
  h.Free(small);
  CHECK(h.Allocate(512, capturing) == small);
  h.Free(small);
  h.Free(second);
  Graph graph = h.End(capture);
  REQUIRE(graph.Reset().ok());
  h.RequireClean();
}

TEST_CASE("growth during capture takes device memory without any synchronization") {
  for (bool expandable : {true, false}) {
    CAPTURE(expandable);
    CaptureHarness h(expandable);
    Stream capturing = h.NewStream();
    Stream other = h.NewStream();
    // Free memory in the default pool that reclaiming would take (after a synchronization).
    void* cached = h.Allocate(64 * kMiB, other);
    h.Free(cached);
    const int64_t syncs = h.device->synchronizations();
    Capture capture = h.Begin(capturing);
    void* big = h.Allocate(200 * kMiB, capturing);
    CHECK(h.PoolOf(big) == capture.pool());
    CHECK(h.device->synchronizations() == syncs);
    h.Free(big);
    Graph graph = h.End(capture);
    REQUIRE(graph.Reset().ok());
    h.RequireClean();
  }
}

TEST_CASE("no memory goes back to the device during capture") {
  CaptureHarness h;
  Stream capturing = h.NewStream();
  Stream other = h.NewStream();
  void* cached = h.Allocate(8 * kMiB, other);
  h.Free(cached);
  const size_t used = h.device->used_bytes();
  Capture capture = h.Begin(capturing);

  absl::Status emptied = h.allocator->EmptyCache();
  CHECK(absl::IsFailedPrecondition(emptied));
  CHECK(emptied.message().find("capture") != absl::string_view::npos);
  CHECK(absl::IsFailedPrecondition(h.manager->Trim(kDefaultPool)));
  CHECK(h.device->used_bytes() == used);

  // Out of memory during capture: the cache is not released to make room, and the error says so.
  h.device->SetFailAllAllocations(true);
  absl::StatusOr<void*> refused = h.manager->Allocate(16 * kMiB, capturing);
  h.device->SetFailAllAllocations(false);
  REQUIRE(absl::IsResourceExhausted(refused.status()));
  CHECK(refused.status().message().find("capture is underway") != absl::string_view::npos);
  CHECK(h.device->used_bytes() == used);

  Graph graph = h.End(capture);
  CHECK(h.allocator->EmptyCache().ok());
  REQUIRE(graph.Reset().ok());
  h.RequireClean();
}

TEST_CASE("a graph's pool keeps its memory while the graph lives, and returns it after") {
  CaptureHarness h;
  Stream capturing = h.NewStream();
  Capture capture = h.Begin(capturing);
  const PoolId pool = capture.pool();
  void* scratch = h.Allocate(32 * kMiB, capturing);
  void* output = h.Allocate(kMiB, capturing);  // outlives the capture, like a graph's output
  h.Free(scratch);
  Graph graph = h.End(capture);
  REQUIRE(graph.Launch(capturing).ok());
  const int64_t reserved = h.ReservedIn(pool);
  CHECK(reserved >= static_cast<int64_t>(33 * kMiB));

  // Nothing takes it: not EmptyCache, not trimming, not another pool's growth.
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.ReservedIn(pool) == reserved);
  CHECK(absl::IsFailedPrecondition(h.manager->Trim(pool)));
  Stream other = h.NewStream();
  void* elsewhere = h.Allocate(64 * kMiB, other);
  CHECK(h.ReservedIn(pool) == reserved);
  h.Free(elsewhere);
  // The output is freed back into the graph's pool, which keeps it too.
  h.Free(output);
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.ReservedIn(pool) == reserved);

  // Destroying the graph releases the pool: after a synchronization (a replay may still be
  // running), its memory goes back.
  const int64_t syncs = h.device->synchronizations();
  REQUIRE(graph.Reset().ok());
  CHECK(h.device->synchronizations() > syncs);
  CHECK(h.ReservedIn(pool) == 0);
  CHECK(h.Info(pool).released);
  CHECK(h.Info(pool).gone);
  h.RequireClean();
}

TEST_CASE("a graph pool that grows never moves its own free chunks to another address") {
  CaptureHarness h;
  Stream stream = h.NewStream();
  Capture capture = h.Begin(stream);
  const PoolId pool = capture.pool();
  void* scratch = h.Allocate(4 * kMiB, stream);
  void* output = h.Allocate(4 * kMiB, stream);  // keeps the scratch memory from being extended
  h.Free(scratch);
  Graph graph = h.End(capture);
  const int64_t before = h.ReservedIn(pool);

  // More memory for the pool outside any capture (a stream routed to it): its free scratch chunks
  // could be unmapped and mapped again where the new block goes, as in any other pool, but the
  // graph replays into the scratch addresses, so the pool takes all 6 MiB new.
  REQUIRE(h.manager->Begin(pool, RouteFilter::OnStream(h.IdOf(stream))).ok());
  void* bigger = h.Allocate(6 * kMiB, stream);
  CHECK(h.PoolOf(bigger) == pool);
  CHECK(h.ReservedIn(pool) == before + static_cast<int64_t>(6 * kMiB));
  h.End(pool);
  h.Release(pool);
  h.Free(bigger);
  h.Free(output);
  REQUIRE(graph.Reset().ok());
  h.RequireClean();
}

TEST_CASE("a pool with a graph id keeps its memory however it was begun") {
  CaptureHarness h;
  Stream stream = h.NewStream();
  const PoolId pool = NewGraphPoolId();
  // Begun by hand with ordinary options, as PyTorch's hooks begin a capture's pool.
  REQUIRE(h.manager->Begin(pool, RouteFilter::OnStream(h.IdOf(stream)), PoolOptions{}).ok());
  void* block = h.Allocate(8 * kMiB, stream);
  CHECK(h.PoolOf(block) == pool);
  h.Free(block);
  const int64_t reserved = h.ReservedIn(pool);
  REQUIRE(h.allocator->EmptyCache().ok());
  CHECK(h.ReservedIn(pool) == reserved);
  CHECK(absl::IsFailedPrecondition(h.manager->Trim(pool)));
  h.End(pool);
  h.Release(pool);
  CHECK(h.ReservedIn(pool) == 0);
  h.RequireClean();
}

TEST_CASE("graphs share a pool; it lives while any graph holding it lives") {
  CaptureHarness h;
  Stream stream = h.NewStream();
  absl::StatusOr<SharedPool> shared = SharedPool::Create(h.manager.get());
  REQUIRE(shared.ok());
  const PoolId pool = shared->id();
  CHECK(h.Info(pool).references == 1);

  Capture first_capture = h.Begin(stream, CaptureOptions{pool});
  void* a = h.Allocate(4 * kMiB, stream);
  h.Free(a);
  Graph first = h.End(first_capture);
  Capture second_capture = h.Begin(stream, CaptureOptions{pool});
  void* b = h.Allocate(4 * kMiB, stream);
  CHECK(b == a);  // the second graph reuses the first one's free memory: they share
  h.Free(b);
  Graph second = h.End(second_capture);
  CHECK(second.pool() == pool);
  CHECK(h.Info(pool).references == 3);

  // Sharing by a graph's own pool works the same way.
  Capture third_capture = h.Begin(stream, CaptureOptions{first.pool()});
  Graph third = h.End(third_capture);
  CHECK(h.Info(pool).references == 4);

  const int64_t reserved = h.ReservedIn(pool);
  REQUIRE(shared->Reset().ok());
  REQUIRE(first.Reset().ok());
  REQUIRE(third.Reset().ok());
  CHECK(h.ReservedIn(pool) == reserved);
  CHECK_FALSE(h.Info(pool).released);
  REQUIRE(second.Reset().ok());  // the last holder
  CHECK(h.Info(pool).released);
  CHECK(h.ReservedIn(pool) == 0);
  h.RequireClean();
}

TEST_CASE("an abandoned capture ends its routing, drops its reference and leaks nothing") {
  CaptureHarness h;
  Stream stream = h.NewStream();
  PoolId pool;
  void* kept = nullptr;
  {
    Capture capture = h.Begin(stream);
    pool = capture.pool();
    kept = h.Allocate(2 * kMiB, stream);
    void* scratch = h.Allocate(kMiB, stream);
    h.Free(scratch);
  }  // destroyed without End
  CHECK(h.allocator->captures_underway() == 0);
  CHECK_FALSE(h.device->GetCaptureInfo(stream)->capturing);
  CHECK(h.RouteOf(stream) == kDefaultPool);
  CHECK(h.Info(pool).references == 0);
  CHECK(h.Info(pool).released);
  CHECK(h.device->live_graphs() == 0);
  // Its live block is still the caller's; freeing it lets the pool go.
  CHECK(h.PoolOf(kept) == pool);
  CHECK_FALSE(h.Info(pool).gone);
  h.Free(kept);
  CHECK(h.Info(pool).gone);
  CHECK(h.Info(pool).live_blocks == 0);
  CHECK(h.ReservedIn(pool) == 0);

  // Abandon() does the same, explicitly.
  Capture capture = h.Begin(stream);
  REQUIRE(capture.Abandon().ok());
  CHECK_FALSE(capture.active());
  CHECK(h.Info(capture.pool()).released);
  CHECK(h.allocator->captures_underway() == 0);
  h.RequireClean();
}

TEST_CASE("an invalidated capture fails to end, is cleaned up, and the allocator goes on") {
  CaptureHarness h;
  Stream stream = h.NewStream();
  Capture capture = h.Begin(stream);
  const PoolId pool = capture.pool();
  void* inside = h.Allocate(kMiB, stream);
  h.device->InvalidateCapture(stream);
  absl::StatusOr<Graph> graph = capture.End();
  CHECK_FALSE(graph.ok());
  CHECK(graph.status().message().find("cleaned up") != absl::string_view::npos);
  CHECK_FALSE(capture.active());
  CHECK(absl::IsFailedPrecondition(capture.End().status()));  // a second End
  CHECK(h.allocator->captures_underway() == 0);
  CHECK(h.Info(pool).released);
  CHECK(h.RouteOf(stream) == kDefaultPool);
  CHECK(h.device->live_graphs() == 0);
  h.Free(inside);
  void* after = h.Allocate(kMiB, stream);
  CHECK(h.PoolOf(after) == kDefaultPool);
  h.Free(after);
  h.RequireClean();
}

TEST_CASE("a pool scope inside a capture pauses the capture's routing for this thread only") {
  CaptureHarness h;
  Stream stream = h.NewStream();
  Capture capture = h.Begin(stream);
  const PoolId graph_pool = capture.pool();
  const PoolId symmetric = NewUserPoolId();
  REQUIRE(h.manager->Create(symmetric, PoolOptions{}).ok());
  const PoolInfo graph_before = h.Info(graph_pool);
  const PoolInfo symmetric_before = h.Info(symmetric);

  void* from_graph = h.Allocate(kKiB, stream);
  void* from_symmetric = nullptr;
  void* other_thread = nullptr;
  {
    PoolScope scope(h.manager.get(), symmetric);
    REQUIRE(scope.status().ok());
    from_symmetric = h.Allocate(kKiB, stream);
    // Another thread allocating on the capturing stream still goes to the capture's pool.
    std::thread([&] { other_thread = h.Allocate(kKiB, stream); }).join();
    {
      PoolScope nested(h.manager.get(), symmetric);  // re-entrant
      CHECK(h.RouteOf(stream) == symmetric);
    }
    CHECK(h.RouteOf(stream) == symmetric);
  }
  void* paused = nullptr;
  {
    PoolScope pause(h.manager.get(), kDefaultPool);  // pauses without redirecting elsewhere
    REQUIRE(pause.status().ok());
    paused = h.Allocate(kKiB, stream);
  }
  void* after = h.Allocate(kKiB, stream);
  CHECK(h.PoolOf(paused) == kDefaultPool);
  CHECK(h.PoolOf(from_graph) == graph_pool);
  CHECK(h.PoolOf(from_symmetric) == symmetric);
  CHECK(h.PoolOf(other_thread) == graph_pool);
  CHECK(h.PoolOf(after) == graph_pool);
  // Restored exactly, with balanced references.
  CHECK(h.Info(graph_pool).references == graph_before.references);
  CHECK(h.Info(graph_pool).routes == graph_before.routes);
  CHECK(h.Info(symmetric).references == symmetric_before.references);
  CHECK(h.Info(symmetric).routes == symmetric_before.routes);

  for (void* ptr : {from_graph, from_symmetric, other_thread, paused, after}) h.Free(ptr);
  Graph graph = h.End(capture);
  REQUIRE(graph.Reset().ok());
  h.Release(symmetric);
  h.RequireClean();
}

TEST_CASE("a pool released during capture gives its memory back once the capture is over") {
  CaptureHarness h;
  Stream stream = h.NewStream();
  Stream capturing = h.NewStream();
  const PoolId user = NewUserPoolId();
  h.Begin(user, RouteFilter::CurrentThread());
  void* block = h.Allocate(4 * kMiB, stream);
  h.End(user);
  Capture capture = h.Begin(capturing);
  h.Release(user);
  h.Free(block);  // its last block: normally the pool's memory would go back now
  CHECK(h.ReservedIn(user) > 0);
  Graph graph = h.End(capture);
  CHECK(h.ReservedIn(user) == 0);
  CHECK(h.Info(user).live_blocks == 0);
  REQUIRE(graph.Reset().ok());
  h.RequireClean();
}

TEST_CASE("a stream destroyed while a capture runs, after a deferred free's use on it, is never "
          "touched again") {
  CaptureHarness h;
  Stream capturing = h.NewStream();
  Stream side = h.NewStream();     // outside the capture: real work
  Stream forked = h.NewStream();   // joins the capture: graph work
  void* before = h.Allocate(kMiB, capturing);  // the default pool, before the capture
  REQUIRE(h.allocator->RecordStream(before, side).ok());
  h.device->Enqueue(side);
  Capture capture = h.Begin(capturing);
  h.device->JoinCapture(forked, capturing);
  void* inside = h.Allocate(kMiB, capturing);
  REQUIRE(h.allocator->RecordStream(inside, forked).ok());
  h.Free(before);
  h.Free(inside);
  REQUIRE(h.device->DestroyStream(side).ok());
  Graph graph = h.End(capture);
  REQUIRE(h.device->DestroyStream(forked).ok());
  CHECK(h.device->destroyed_stream_uses() == 0);
  CHECK(h.device->capture_violations() == 0);
  // Both blocks are free: the side stream's work was waited for by a device synchronization.
  CHECK(h.allocator->SnapshotJson().find("awaiting_events") == std::string::npos);
  void* again = h.allocator->Allocate(kMiB, capturing).value();
  CHECK(again == before);
  h.Free(again);
  REQUIRE(graph.Reset().ok());
  CHECK(h.device->destroyed_stream_uses() == 0);
  h.RequireClean();
}

TEST_CASE("two captures at once: each has its own pool, and deferred frees wait for both") {
  CaptureHarness h;
  Stream first_stream = h.NewStream();
  Stream second_stream = h.NewStream();
  Stream helper = h.NewStream();
  Capture first = h.Begin(first_stream);
  Capture second = h.Begin(second_stream);
  CHECK(first.pool() != second.pool());
  CHECK(h.allocator->captures_underway() == 2);
  void* a = h.Allocate(kMiB, first_stream);
  void* b = h.Allocate(kMiB, second_stream);
  CHECK(h.PoolOf(a) == first.pool());
  CHECK(h.PoolOf(b) == second.pool());
  REQUIRE(h.allocator->RecordStream(a, helper).ok());
  const int64_t events = h.device->live_events();
  h.Free(a);
  Graph first_graph = h.End(first);
  CHECK(h.device->live_events() == events);  // still a capture underway
  h.Free(b);
  const int64_t synchronizations = h.device->synchronizations();
  Graph second_graph = h.End(second);
  // `helper` is outside every capture, so its work up to the free may still be queued: the end of
  // the last capture waits for the device (never for `helper` itself, whose handle may be gone)
  // before the block is free again.
  CHECK(h.device->live_events() == events);
  CHECK(h.device->synchronizations() == synchronizations + 1);
  CHECK(h.allocator->SnapshotJson().find("awaiting_events") == std::string::npos);
  h.device->CompleteAll();
  REQUIRE(first_graph.Reset().ok());
  REQUIRE(second_graph.Reset().ok());
  h.RequireClean();
}

TEST_CASE("captures begun and ended while other threads allocate and free never see an event "
          "query") {
  CaptureHarness h;
  constexpr int kWorkers = 4;
  std::vector<Stream> own;
  std::vector<Stream> used_on;
  for (int i = 0; i < kWorkers; ++i) {
    own.push_back(h.NewStream());
    used_on.push_back(h.NewStream());
  }
  Stream capturing = h.NewStream();
  std::atomic<bool> stop{false};
  std::atomic<int64_t> failures{0};
  std::vector<std::thread> workers;
  for (int i = 0; i < kWorkers; ++i) {
    workers.emplace_back([&, i] {
      // Frees after cross-stream use: outside captures they record events, and allocations
      // harvest them; inside they must do neither.
      while (!stop.load()) {
        absl::StatusOr<void*> block = h.manager->Allocate((i + 1) * 4 * kKiB, own[i]);
        if (!block.ok() || !h.allocator->RecordStream(*block, used_on[i]).ok() ||
            !h.allocator->Free(*block).ok()) {
          failures.fetch_add(1);
        }
        h.device->Enqueue(used_on[i]);
        h.device->Complete(used_on[i]);
      }
    });
  }
  for (int round = 0; round < 200; ++round) {
    Capture capture = h.Begin(capturing);
    void* inside = h.Allocate(kMiB, capturing);
    h.Free(inside);
    Graph graph = h.End(capture);
  }
  stop.store(true);
  for (std::thread& worker : workers) worker.join();
  CHECK(failures.load() == 0);
  CHECK(h.device->capture_violations() == 0);
  CHECK(h.allocator->captures_underway() == 0);
  h.device->CompleteAll();
  h.RequireClean();
}

TEST_CASE("capture misuse gives clear errors and leaves nothing behind") {
  CaptureHarness h;
  Stream stream = h.NewStream();
  // The legacy default stream cannot be captured.
  absl::StatusOr<Capture> on_default = Capture::Begin(h.device.get(), h.manager.get(), nullptr);
  CHECK_FALSE(on_default.ok());
  CHECK(h.allocator->captures_underway() == 0);
  // The capture's device must be given, and be the pools' device (its ordinal).
  CHECK(absl::IsInvalidArgument(Capture::Begin(nullptr, h.manager.get(), stream).status()));
  SimulatedDevice::Options elsewhere_options;
  elsewhere_options.ordinal = h.device->ordinal() + 1;
  SimulatedDevice elsewhere(elsewhere_options);
  absl::StatusOr<Stream> elsewhere_stream = elsewhere.CreateStream();
  REQUIRE(elsewhere_stream.ok());
  absl::StatusOr<Capture> on_other_device =
      Capture::Begin(&elsewhere, h.manager.get(), *elsewhere_stream);
  INFO("Capture::Begin on another device: " << on_other_device.status().ToString());
  CHECK(absl::IsInvalidArgument(on_other_device.status()));
  CHECK_FALSE(elsewhere.GetCaptureInfo(*elsewhere_stream)->capturing);
  CHECK(h.allocator->captures_underway() == 0);
  // Sharing: not a graph pool, a pool never made, a pool nothing holds.
  const PoolId user = NewUserPoolId();
  REQUIRE(h.manager->Create(user, PoolOptions{}).ok());
  CHECK(absl::IsInvalidArgument(
      Capture::Begin(h.device.get(), h.manager.get(), stream, CaptureOptions{user}).status()));
  CHECK(absl::IsNotFound(
      Capture::Begin(h.device.get(), h.manager.get(), stream, CaptureOptions{NewGraphPoolId()})
          .status()));
  PoolId gone;
  {
    Capture capture = h.Begin(stream);
    gone = capture.pool();
    Graph graph = h.End(capture);
  }
  CHECK(absl::IsFailedPrecondition(
      Capture::Begin(h.device.get(), h.manager.get(), stream, CaptureOptions{gone}).status()));
  // A stream already capturing cannot begin another capture; the first one is untouched.
  Capture capture = h.Begin(stream);
  CHECK_FALSE(Capture::Begin(h.device.get(), h.manager.get(), stream).ok());
  CHECK(h.allocator->captures_underway() == 1);
  CHECK(h.Info(capture.pool()).references == 1);
  // A capture mark cannot end where none began.
  Graph graph = h.End(capture);
  CHECK(absl::IsFailedPrecondition(h.allocator->NoteCaptureEnd()));
  CHECK(h.allocator->captures_underway() == 0);
  // An empty graph cannot launch.
  Graph empty;
  CHECK(absl::IsFailedPrecondition(empty.Launch(stream)));
  REQUIRE(graph.Reset().ok());
  REQUIRE(graph.Reset().ok());  // a second Reset does nothing
  h.Release(user);
  h.RequireClean();
}

}  // namespace
}  // namespace tidepool
