// A randomized differential test of pools and routing (pool/pool_manager.h) against a model.
//
// The rule tests in this folder check one rule at a time; this one drives a million random
// operations over four pools, the default pool and four streams: allocations through
// PoolManager::Allocate, frees, RecordStream with work enqueued and completed on the simulated
// clock, Begin / End / Release with current-thread, everyone and stream filters (refusals
// included: End without a route, double Release, Release of the last reference while routed,
// Release of the default pool or of a pool the device never had), and now and then EmptyCache and
// Trim. A model predicts, and the test checks:
//   * the routing decision of every allocation (RouteOf before, PoolOf of the block after; the
//     table searched newest first), and RouteOf of every stream every few operations;
//   * the status code of every Begin / End / Release;
//   * Info of every pool after every operation: references, routes, live blocks, released;
//   * the statistics of the pool an operation touched (live blocks, requested and allocated
//     bytes);
//   * pools that must be gone hold nothing (Stats reserved_bytes and segments 0), a pool begun
//     after it was gone starts with fresh statistics, a revived one keeps them;
//   * after EmptyCache or Trim, a pool with no live block holds nothing;
//   * reuse is never unsafe (bytes freed on stream S, or used on U by RecordStream, are handed out
//     again on another stream only once that work completed), and bytes of one pool are never
//     handed out by another (the shared reuse-safety oracle, tests/testing/reuse_oracle.h);
//   * the snapshot of a pool lists exactly its live blocks (every 5,000 operations);
// and at the end everything is freed, every route ended and every reference released, the cache
// emptied, and the device must hold nothing.
//
// CUDA graph capture (graph/capture.h) runs through the same sequences: captures begun on the
// test's streams (into a new private pool, the pool of a live graph, of a SharedPool or of another
// running capture; refused on a stream already capturing and for a pool that is not a held graph
// pool), streams joined to a running capture, captures ended (the Graph kept), abandoned (by
// Abandon or by destruction), invalidated by the device and then ended (an error, and cleanup) or
// abandoned, graphs launched on a stream and destroyed (Reset or destruction), SharedPools made
// and dropped; allocations, frees, RecordStream, Begin / End / Release, Trim and EmptyCache go on
// while captures run. The model also predicts, and the test checks:
//   * routing: a stream taking part in a valid capture routes to that capture's pool, unless a
//     newer route matches (newest first, as always); a stream of an invalidated capture does not;
//     a stream route does not match its stream while that takes part in a capture (StreamIdOf);
//   * Info of every graph pool not gone for good: a capture, a Graph and a SharedPool each hold
//     one reference; released exactly when none is left;
//   * captures_underway() is the number of captures running, capture_violations() stays 0 and
//     live_graphs() is the number of Graphs alive, after every operation;
//   * EmptyCache and Trim fail with FAILED_PRECONDITION exactly while a capture is underway (and
//     Trim of a graph pool something holds, always), and give nothing back then;
//   * a block freed during capture after use on another stream is not handed out again before the
//     captures are over, and then only once the work queued on those streams up to the end of the
//     capture has completed;
//   * no memory goes back to the device while a capture is underway: a pool that goes then holds
//     its memory until the captures are over, and then nothing; a graph pool something holds
//     never gives memory back;
// and at the end every capture is over and every graph and SharedPool gone: the device holds no
// memory, no graph and (once the allocator is destroyed) no event.
//
// A second case runs four threads, each with its own streams, its own two pools (current-thread
// and stream routes, exact model) and scopes on one pool they all share, handing blocks to each
// other to free: every block lands in the pool its thread's routes say; two of the threads exit
// with routes still open, and the teardown must still leave nothing behind.
//
// Seeded and reproducible: the seed is printed; TIDEPOOL_TEST_SEED=<n> replays one
// (`bazel test --test_env=TIDEPOOL_TEST_SEED=123 //tests/pool:pool_differential_test`), and
// TIDEPOOL_DIFFERENTIAL_OPS overrides the number of operations of the single-threaded run. On
// failure the message names the seed, the operation and the last operations.
#include <catch2/catch.hpp>

#include <algorithm>
#include <array>
#include <atomic>
#include <cinttypes>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <memory>
#include <mutex>
#include <optional>
#include <random>
#include <set>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "allocator/stats.h"
#include "graph/capture.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"
#include "tests/testing/randomized_run.h"
#include "tests/testing/reuse_oracle.h"

namespace tidepool {
namespace {

using testing::ArenaTag;
using testing::ReuseOracle;

constexpr size_t kMiB = size_t{1} << 20;

// Allocation sizes: 1 B to 8 MiB, most of them small.
constexpr testing::SizeBand kSizes[] = {
    {70, 0, 16},    // 1 B .. 64 KiB
    {95, 15, 20},   // 32 KiB .. 1 MiB
    {100, 20, 23},  // 1 MiB .. 8 MiB
};

const char* CodeName(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk: return "OK";
    case absl::StatusCode::kNotFound: return "NOT_FOUND";
    case absl::StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case absl::StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
    case absl::StatusCode::kInternal: return "INTERNAL";
    default: return "another code";
  }
}

std::unique_ptr<CachingAllocator> MakeAllocator(SimulatedDevice* device, bool expandable) {
  Config config;
  config.expandable_segments = expandable;
  // Small reserved ranges: pools that come and go make new ranges, and the allocator keeps a
  // page-map entry for every one it ever had.
  config.expandable_reserve = 512 * kMiB;
  absl::StatusOr<std::unique_ptr<CachingAllocator>> made = CachingAllocator::Create(device, config);
  REQUIRE(made.ok());
  return std::move(*made);
}

// ------------------------------------------------------------------------------------------------
// Single-threaded run.

constexpr int kPools = 4;                // user pools 0..3
constexpr int kDefault = kPools;         // index of the default pool
constexpr int kUnknown = kPools + 1;     // index of an id the device never has
constexpr int kStreams = 4;
constexpr int kMaxRoutes = 12;           // routes begun by the test (captures' routes aside)
constexpr int kFirstGraphPool = kUnknown + 1;  // graph pools (captures, SharedPools) from here
constexpr size_t kMaxCaptures = 3;
constexpr size_t kMaxGraphs = 6;
constexpr size_t kMaxSharedPools = 2;
// Out of 1000 operations, how many are capture operations (begin, join, end, abandon,
// invalidate, launch, destroy a graph, SharedPools).
constexpr uint64_t kCaptureShare = 9;

struct ModelRoute {
  uint64_t sequence = 0;
  RouteFilter::Kind kind = RouteFilter::Kind::kCurrentThread;
  int stream = 0;  // kStream
  uint64_t capture = 0;  // kCapture: the device's capture id
  int pool = 0;
};

struct ModelPool {
  PoolId id;
  bool known = false;
  int64_t references = 0;
  int64_t routes = 0;
  int64_t live = 0;
  int64_t requested = 0;
  int64_t allocated = 0;
  int generation = 0;  // 1 once created (a pool keeps its arena for the manager's life)
  bool graph = false;  // a graph pool (a capture's or a SharedPool's)
  int64_t reserved_floor = 0;  // graph pools: reserved bytes last seen while held
  bool went_in_capture = false;  // went while a capture was underway, which kept its memory
};

struct LiveBlock {
  uintptr_t address = 0;
  size_t requested = 0;
  size_t size = 0;
  int stream = 0;
  int pool = 0;
  int generation = 0;
  uint8_t uses = 0;  // bit u: RecordStream on stream u (never the block's own)
};

struct Counters {
  int64_t allocations = 0, frees = 0, routed_allocations = 0, record_streams = 0;
  int64_t begins = 0, created = 0, revived = 0, afresh = 0;
  int64_t ends = 0, end_refusals = 0;
  int64_t releases = 0, release_refusals = 0, gone = 0;
  int64_t empty_caches = 0, trims = 0, snapshots = 0, route_checks = 0;
  // Captures.
  int64_t capture_begins = 0, private_pools = 0, shared_graph_pools = 0, shared_handle_pools = 0;
  int64_t shared_capture_pools = 0, busy_stream_refusals = 0, not_graph_pool_refusals = 0;
  int64_t unknown_pool_refusals = 0, released_pool_refusals = 0;
  int64_t joins = 0, graphs_made = 0, failed_ends = 0, abandons = 0, destroyed_captures = 0;
  int64_t invalidations = 0, launches = 0, graph_resets = 0, destroyed_graphs = 0;
  int64_t shared_creates = 0, shared_resets = 0, graph_pools_gone = 0;
  int64_t captured_allocations = 0, joined_allocations = 0, overridden_in_capture = 0;
  int64_t invalidated_allocations = 0, record_streams_in_capture = 0, deferred_frees = 0;
  int64_t empty_cache_refusals = 0, trim_refusals_capture = 0;
  int64_t trim_refusals_graph = 0, ops_in_capture = 0, pools_freed_after_capture = 0;
};

class PoolDifferentialRun {
 public:
  PoolDifferentialRun(bool expandable, uint64_t seed, int64_t ops)
      : expandable_(expandable), seed_(seed), ops_(ops), random_(seed) {
    SimulatedDevice::Options options;
    options.capacity = size_t{16} << 30;
    device_ = std::make_unique<SimulatedDevice>(options);
    allocator_ = MakeAllocator(device_.get(), expandable);
    manager_ = std::make_unique<PoolManager>(allocator_.get());
    for (int s = 0; s < kStreams; ++s) {
      absl::StatusOr<Stream> stream = device_->CreateStream();
      REQUIRE(stream.ok());
      streams_[s] = *stream;
      stream_ids_[s] = *device_->GetStreamId(*stream);
    }
    oracle_.emplace(device_.get(), streams_);
    for (int p = 0; p < kPools; ++p) pools_[p].id = NewUserPoolId();
    pools_[kDefault].id = kDefaultPool;
    pools_[kDefault].known = true;
    pools_[kUnknown].id = NewUserPoolId();
  }

  void Run() {
    std::printf("pool differential run: expandable_segments=%d seed=%" PRIu64 " ops=%" PRId64 "\n",
                expandable_ ? 1 : 0, seed_, ops_);
    std::fflush(stdout);
    for (op_ = 0; op_ < ops_; ++op_) {
      Step();
      CheckInfo();
      if (op_ % 16 == 0) CheckRoutes();
      if (op_ % 4096 == 0) PruneFreed();
      if (op_ % 5000 == 0) CheckSnapshot(static_cast<int>(random_() % (kPools + 1)));
      if (op_ % 5000 == 2500 && !watched_graph_pools_.empty()) {
        CheckSnapshot(watched_graph_pools_[random_() % watched_graph_pools_.size()]);
      }
      if (op_ % 64 == 0) CheckGraphPoolsKeepMemory();
      if (op_ % 1000 == 0) {
        Check(allocator_->GetStats().reserved_bytes.current ==
                  static_cast<int64_t>(device_->used_bytes()),
              "the allocator's reserved bytes differ from what the device holds");
      }
    }
    Teardown();
    const Counters& c = counters_;
    std::printf(
        "pool differential run done: %" PRId64 " allocations (%" PRId64 " routed), %" PRId64
        " frees, %" PRId64 " RecordStream, %" PRId64 " reuses after RecordStream checked; %" PRId64
        " begins (%" PRId64 " created, %" PRId64 " revived with live blocks, %" PRId64
        " afresh after gone), %" PRId64 " ends (%" PRId64 " refused), %" PRId64
        " releases (%" PRId64 " refused), %" PRId64 " pools gone; %" PRId64 " EmptyCache, %" PRId64
        " Trim, %" PRId64 " snapshots, %" PRId64 " RouteOf checks, %" PRId64 " oracle checks\n",
        c.allocations, c.routed_allocations, c.frees, c.record_streams, oracle_->guarded_reuses(),
        c.begins, c.created, c.revived, c.afresh, c.ends, c.end_refusals, c.releases,
        c.release_refusals, c.gone, c.empty_caches, c.trims, c.snapshots, c.route_checks,
        checks_);
    std::fflush(stdout);
    // The run exercised what it is meant to.
    CHECK(c.routed_allocations > ops_ / 20);
    // (ops / 25, not / 20: running captures take a share of what went to the default pool.)
    CHECK(c.allocations - c.routed_allocations > ops_ / 25);
    CHECK(c.revived > 0);
    CHECK(c.afresh > 0);
    CHECK(c.gone > 0);
    CHECK(c.end_refusals > 0);
    CHECK(c.release_refusals > 0);
    CHECK(oracle_->guarded_reuses() > 0);
    std::printf(
        "pool differential run, captures: %" PRId64 " begun (%" PRId64 " private pools, %" PRId64
        " sharing a graph's pool, %" PRId64 " a SharedPool's, %" PRId64
        " a running capture's), refused: %" PRId64 " on a capturing stream, %" PRId64
        " not a graph pool, %" PRId64 " unknown pool, %" PRId64 " released pool; %" PRId64
        " joins, %" PRId64 " invalidations; %" PRId64 " graphs made, %" PRId64
        " failed ends, %" PRId64 " abandons (%" PRId64 " by destruction); %" PRId64
        " launches, %" PRId64 " graph resets, %" PRId64 " graphs destroyed; %" PRId64
        " SharedPools made, %" PRId64 " dropped; %" PRId64 " graph pools gone\n"
        "  during capture: %" PRId64 " ops, %" PRId64 " allocations in graph pools (%" PRId64
        " on joined streams), %" PRId64 " overridden by a newer route, %" PRId64
        " on invalidated captures' streams, %" PRId64 " RecordStream, %" PRId64
        " deferred frees (%" PRId64 " reuses checked), %" PRId64 " EmptyCache and %" PRId64
        " Trim refused (%" PRId64 " Trim of a held graph pool); %" PRId64
        " pools that went during a capture freed after it\n",
        c.capture_begins, c.private_pools, c.shared_graph_pools, c.shared_handle_pools,
        c.shared_capture_pools, c.busy_stream_refusals, c.not_graph_pool_refusals,
        c.unknown_pool_refusals, c.released_pool_refusals, c.joins, c.invalidations,
        c.graphs_made, c.failed_ends, c.abandons, c.destroyed_captures, c.launches,
        c.graph_resets, c.destroyed_graphs, c.shared_creates, c.shared_resets,
        c.graph_pools_gone, c.ops_in_capture, c.captured_allocations, c.joined_allocations,
        c.overridden_in_capture, c.invalidated_allocations, c.record_streams_in_capture,
        c.deferred_frees, oracle_->deferred_reuses(), c.empty_cache_refusals,
        c.trim_refusals_capture, c.trim_refusals_graph, c.pools_freed_after_capture);
    std::fflush(stdout);
    // Every capture operation happened, often enough: at least so many per million operations
    // (about a third of what the default seeds see), and at least once.
    const auto per_million = [&](int64_t n) { return std::max<int64_t>(1, ops_ * n / 1000000); };
    REQUIRE(c.capture_begins >= per_million(500));
    REQUIRE(c.private_pools >= per_million(250));
    REQUIRE(c.shared_graph_pools >= per_million(100));
    REQUIRE(c.shared_handle_pools >= per_million(100));
    REQUIRE(c.shared_capture_pools >= per_million(20));
    REQUIRE(c.busy_stream_refusals >= per_million(100));
    REQUIRE(c.not_graph_pool_refusals >= per_million(20));
    REQUIRE(c.unknown_pool_refusals >= per_million(10));
    REQUIRE(c.released_pool_refusals >= per_million(10));
    REQUIRE(c.joins >= per_million(500));
    REQUIRE(c.invalidations >= per_million(50));
    REQUIRE(c.graphs_made >= per_million(300));
    REQUIRE(c.failed_ends >= per_million(40));
    REQUIRE(c.abandons >= per_million(100));
    REQUIRE(c.destroyed_captures >= per_million(40));
    REQUIRE(c.launches >= per_million(250));
    REQUIRE(c.graph_resets >= per_million(200));
    REQUIRE(c.destroyed_graphs >= per_million(100));
    REQUIRE(c.shared_creates >= per_million(50));
    REQUIRE(c.shared_resets >= per_million(50));
    REQUIRE(c.graph_pools_gone >= per_million(300));
    REQUIRE(c.ops_in_capture >= per_million(250000));  // about half the run, either way
    REQUIRE(c.ops_in_capture <= per_million(750000));
    REQUIRE(c.captured_allocations >= per_million(10000));
    REQUIRE(c.joined_allocations >= per_million(2500));
    REQUIRE(c.overridden_in_capture >= per_million(10000));
    REQUIRE(c.invalidated_allocations >= per_million(2500));
    REQUIRE(c.record_streams_in_capture >= per_million(5000));
    REQUIRE(c.deferred_frees >= per_million(5000));
    REQUIRE(oracle_->deferred_reuses() >= per_million(5000));
    REQUIRE(c.empty_cache_refusals >= per_million(50));
    REQUIRE(c.trim_refusals_capture >= per_million(25));
    REQUIRE(c.trim_refusals_graph >= per_million(100));
    REQUIRE(c.pools_freed_after_capture >= per_million(150));
  }

 private:
  void Fail(const std::string& what) {
    FAIL("pool differential run (expandable_segments=" << expandable_ << ", seed " << seed_
                                                       << ") failed at operation " << op_ << ": "
                                                       << what << "\nlast operations:\n"
                                                       << absl::StrJoin(history_, "\n"));
  }
  void Check(bool condition, const std::string& what) {
    ++checks_;
    if (!condition) Fail(what);
  }
  // The same, with the message made only on failure.
  template <typename Message, typename = decltype(std::declval<Message>()())>
  void Check(bool condition, Message&& what) {
    ++checks_;
    if (!condition) Fail(what());
  }
  void Note(std::string text) {
    if (history_.size() == 16) history_.pop_front();
    history_.push_back(absl::StrCat(op_, ": ", text));
  }
  std::string Name(int pool) const {
    if (pool == kDefault) return "default";
    return absl::StrCat(pools_[pool].graph ? "graph pool " : "pool ", pool, " ",
                        pools_[pool].id.ToString());
  }
  // No capture underway: memory may go back to the device.
  bool Quiet() const { return captures_.empty(); }
  bool Gone(int pool) const {
    const ModelPool& m = pools_[pool];
    return pool != kDefault && m.known && m.references == 0 && m.live == 0;
  }

  // --- The model of routing -------------------------------------------------------------------

  int Predict(int stream) const {
    for (auto it = routes_.rbegin(); it != routes_.rend(); ++it) {
      switch (it->kind) {
        case RouteFilter::Kind::kCurrentThread:
        case RouteFilter::Kind::kEveryone:
          return it->pool;
        case RouteFilter::Kind::kStream:
          // A stream taking part in a capture (even an invalidated one) is known by its
          // capture-time id then (CachingAllocator::StreamIdOf): its stream routes do not match.
          if (it->stream == stream && stream_capture_[stream].id == 0) return it->pool;
          break;
        case RouteFilter::Kind::kCapture:
          // Only a stream taking part in the capture, and not once the capture is invalidated
          // (the device stops reporting it).
          if (stream_capture_[stream].id == it->capture && !stream_capture_[stream].invalidated) {
            return it->pool;
          }
          break;
        case RouteFilter::Kind::kCallable:
          break;  // the model begins none (NCCL scopes own them; tests/nccl tests them)
      }
    }
    return kDefault;
  }

  void Step() {
    if (burst_left_ > 0) {
      --burst_left_;
      if (DoBurstStep()) return;
    }
    if (random_() % 1000 < kCaptureShare) return DoCaptureOp();
    const uint64_t dice = random_() % 1000;
    const int alloc_share = live_.size() < 48 ? 620 : live_.size() > 256 ? 260 : 420;
    if (live_.empty() || dice < static_cast<uint64_t>(alloc_share)) return DoAllocate();
    if (dice < 740) return DoFree();
    if (dice < 780) return DoRecordStream();
    if (dice < 820) {
      const int s = static_cast<int>(random_() % kStreams);
      enqueued_[s] = device_->Enqueue(streams_[s]);
      Note(absl::StrCat("Enqueue(stream ", s, ") -> ", enqueued_[s]));
      return;
    }
    if (dice < 860) {
      const int s = static_cast<int>(random_() % kStreams);
      const uint64_t position = random_() % 2 == 0 ? enqueued_[s] : random_() % (enqueued_[s] + 1);
      device_->Complete(streams_[s], position);
      Note(absl::StrCat("Complete(stream ", s, ", ", position, ")"));
      return;
    }
    if (dice < 905) return DoBegin();
    if (dice < 950) return DoEnd();
    if (dice < 996) return DoRelease();
    if (dice < 998) return DoTrim();
    if (random_() % 4 == 0) return DoEmptyCache();
  }

  // On `stream`, or on a random one.
  void DoAllocate(int stream = -1) {
    const int s = stream >= 0 ? stream : static_cast<int>(random_() % kStreams);
    const size_t size = testing::RandomSize(random_, kSizes);
    const int expected = Predict(s);
    absl::StatusOr<PoolId> route = manager_->RouteOf(streams_[s]);
    Check(route.ok() && *route == pools_[expected].id, [&] {
      return absl::StrCat("RouteOf(stream ", s, ") is ",
                          route.ok() ? route->ToString() : route.status().ToString(),
                          "; the model says ", Name(expected));
    });
    absl::StatusOr<void*> result = manager_->Allocate(size, streams_[s]);
    Note(absl::StrCat("Allocate(", size, ", stream ", s, ") -> ",
                      result.ok() ? absl::StrCat(reinterpret_cast<uintptr_t>(*result))
                                  : result.status().ToString(),
                      " (model: ", Name(expected), ")"));
    Check(result.ok(),
          [&] { return absl::StrCat("an allocation failed: ", result.status().ToString()); });
    ++counters_.allocations;
    if (expected != kDefault) ++counters_.routed_allocations;
    if (stream_capture_[s].id != 0) {
      const RunningCapture& capture = CaptureById(stream_capture_[s].id);
      if (stream_capture_[s].invalidated) {
        ++counters_.invalidated_allocations;
      } else if (expected != capture.pool) {
        ++counters_.overridden_in_capture;
      } else {
        ++counters_.captured_allocations;
        if (capture.stream != s) ++counters_.joined_allocations;
      }
    }
    LiveBlock block;
    block.address = reinterpret_cast<uintptr_t>(*result);
    block.requested = size;
    block.stream = s;
    block.pool = expected;
    block.generation = pools_[expected].generation;
    absl::StatusOr<size_t> block_size = allocator_->BlockSize(*result);
    Check(block_size.ok() && *block_size >= size, "BlockSize of a new block is wrong");
    block.size = *block_size;
    absl::StatusOr<PoolId> of = manager_->PoolOf(*result);
    Check(of.ok() && *of == pools_[expected].id, [&] {
      return absl::StrCat("the block landed in ", of.ok() ? of->ToString() : of.status().ToString(),
                          "; the model says ", Name(expected));
    });
    // No overlap with a live block; freed bytes reused only by the pool (and arena) they were
    // freed into, and only as stream ordering allows.
    const std::vector<std::string> unsafe = oracle_->Admit(
        block.address, block.address + block.size, s, ArenaTag{expected, block.generation});
    Check(unsafe.empty(), [&] { return absl::StrJoin(unsafe, "\n"); });
    live_.push_back(block);
    ModelPool& pool = pools_[expected];
    ++pool.live;
    pool.requested += static_cast<int64_t>(block.requested);
    pool.allocated += static_cast<int64_t>(block.size);
    CheckPoolStats(expected);
  }

  // Forgets the freed bytes of arenas that are gone: they went back to the device, and the
  // simulated device never hands the same addresses out again.
  void PruneFreed() {
    oracle_->ForgetArenas([this](const ArenaTag& arena) {
      return arena.generation != pools_[arena.pool].generation || Gone(arena.pool);
    });
  }

  // The first live block of pool `p` from `start` on (wrapping), else `start`.
  size_t FindLiveIn(int p, size_t start) const {
    for (size_t i = 0; i < live_.size(); ++i) {
      const size_t at = (start + i) % live_.size();
      if (live_[at].pool == p) return at;
    }
    return start;
  }

  // A random block; with `prefer`, a block of that pool if it has one.
  void DoFree(int prefer = -1) {
    size_t index = random_() % live_.size();
    if (prefer >= 0) {
      index = FindLiveIn(prefer, index);
    } else if (random_() % 2 == 0) {
      // Now and then, drain a released pool, so that pools go away and come back afresh.
      for (size_t tries = 0; tries < 8; ++tries) {
        const size_t candidate = random_() % live_.size();
        const int p = live_[candidate].pool;
        if (p != kDefault && pools_[p].references == 0) {
          index = candidate;
          break;
        }
      }
    }
    const LiveBlock block = live_[index];
    live_[index] = live_.back();
    live_.pop_back();
    // The routing in force at the free is irrelevant: the block goes back to its own pool.
    absl::StatusOr<PoolId> of = manager_->PoolOf(reinterpret_cast<void*>(block.address));
    Check(of.ok() && *of == pools_[block.pool].id, "PoolOf of a live block changed");
    const absl::Status freed = allocator_->Free(reinterpret_cast<void*>(block.address));
    Note(absl::StrCat("Free(", block.address, " of ", Name(block.pool), ", stream ", block.stream,
                      ", uses ", block.uses, ") -> ", freed.ToString()));
    Check(freed.ok(),
          [&] { return absl::StrCat("Free of a live block failed: ", freed.ToString()); });
    ++counters_.frees;
    // Freed during capture after use on other streams: the allocator records its events only
    // when the captures are over.
    const bool deferred = !Quiet() && block.uses != 0;
    if (deferred) ++counters_.deferred_frees;
    const std::string not_live = oracle_->Retire(block.address, block.uses, enqueued_, deferred);
    Check(not_live.empty(), not_live);
    ModelPool& pool = pools_[block.pool];
    --pool.live;
    pool.requested -= static_cast<int64_t>(block.requested);
    pool.allocated -= static_cast<int64_t>(block.size);
    if (Gone(block.pool)) {
      if (!Quiet()) pool.went_in_capture = true;
      ++counters_.gone;
      Note(absl::StrCat(Name(block.pool), " is gone with its last block"));
    }
    CheckPoolStats(block.pool);
  }

  void DoRecordStream(int prefer = -1) {
    size_t index = random_() % live_.size();
    if (prefer >= 0) index = FindLiveIn(prefer, index);
    LiveBlock& block = live_[index];
    const int u = static_cast<int>(random_() % kStreams);
    enqueued_[u] = device_->Enqueue(streams_[u]);  // the use
    const absl::Status recorded =
        allocator_->RecordStream(reinterpret_cast<void*>(block.address), streams_[u]);
    Note(absl::StrCat("RecordStream(", block.address, ", stream ", u, ") -> ", recorded.ToString()));
    Check(recorded.ok(), "RecordStream on a live block failed");
    ++counters_.record_streams;
    if (!Quiet()) ++counters_.record_streams_in_capture;
    if (u != block.stream) block.uses |= static_cast<uint8_t>(1u << u);
  }

  void DoBegin() {
    if (routes_.size() - captures_.size() >= kMaxRoutes) return DoEnd();
    int p = random_() % 8 == 0 ? kDefault : static_cast<int>(random_() % kPools);
    // Give released pools time to drain (and go) before they are revived.
    if (p != kDefault && pools_[p].known && pools_[p].references == 0 && pools_[p].live > 0 &&
        random_() % 8 != 0) {
      p = static_cast<int>(random_() % kPools);
    }
    RouteFilter filter;
    ModelRoute route;
    route.pool = p;
    const uint64_t kind = random_() % 10;
    if (kind < 5) {
      filter = RouteFilter::CurrentThread();
      route.kind = RouteFilter::Kind::kCurrentThread;
    } else if (kind < 7) {
      filter = RouteFilter::Everyone();
      route.kind = RouteFilter::Kind::kEveryone;
    } else {
      route.stream = static_cast<int>(random_() % kStreams);
      filter = RouteFilter::OnStream(stream_ids_[route.stream]);
      route.kind = RouteFilter::Kind::kStream;
    }
    ModelPool& pool = pools_[p];
    // What the pool's statistics must be after Begin: fresh when it is created; else, revived
    // or back from gone, the same arena with the statistics it had.
    enum { kCreate, kAfresh, kRevive, kKeep } what = kKeep;
    if (!pool.known) {
      what = kCreate;
    } else if (p != kDefault && pool.references == 0) {
      what = pool.live == 0 ? kAfresh : kRevive;
    }
    AllocatorStats before;
    if (what != kCreate) before = PoolStats(p);
    const absl::Status status = manager_->Begin(pool.id, filter);
    Note(absl::StrCat("Begin(", Name(p), ", ", filter.ToString(), ") -> ", status.ToString()));
    Check(status.ok(), [&] { return absl::StrCat("Begin failed: ", status.ToString()); });
    ++counters_.begins;
    if (what == kCreate) {
      pool.known = true;
      ++pool.generation;
      ++counters_.created;
      const AllocatorStats fresh = PoolStats(p);
      Check(fresh.active_blocks.added == 0 && fresh.reserved_bytes.added == 0 &&
                fresh.requested_bytes.peak == 0,
            [&] { return absl::StrCat(Name(p), " is new but has statistics"); });
    } else {
      if (what == kRevive) ++counters_.revived;
      if (what == kAfresh) ++counters_.afresh;  // same arena, same generation
      const AllocatorStats after = PoolStats(p);
      Check(after.active_blocks.added == before.active_blocks.added &&
                after.requested_bytes.peak == before.requested_bytes.peak,
            [&] {
              return absl::StrCat(Name(p),
                                  " should be the same pool as before Begin, with its statistics");
            });
    }
    if (p != kDefault) ++pool.references;
    ++pool.routes;
    route.sequence = next_sequence_++;
    routes_.push_back(route);
  }

  void DoEnd() {
    // Mostly a pool with a route; sometimes any pool, to be refused.
    int p;
    if (!routes_.empty() && random_() % 5 != 0) {
      const ModelRoute& route = routes_[random_() % routes_.size()];
      // A capture's route is the capture's to end.
      p = route.kind == RouteFilter::Kind::kCapture
              ? static_cast<int>(random_() % (kUnknown + 1))
              : route.pool;
    } else {
      p = static_cast<int>(random_() % (kUnknown + 1));
    }
    // The model: this thread's newest current-thread route to p, else the newest other one.
    auto found = routes_.end();
    for (auto it = routes_.rbegin(); it != routes_.rend(); ++it) {
      if (it->pool == p && it->kind == RouteFilter::Kind::kCurrentThread) {
        found = std::next(it).base();
        break;
      }
    }
    if (found == routes_.end()) {
      for (auto it = routes_.rbegin(); it != routes_.rend(); ++it) {
        if (it->pool == p) {
          found = std::next(it).base();
          break;
        }
      }
    }
    const absl::StatusCode expected =
        found == routes_.end() ? absl::StatusCode::kFailedPrecondition : absl::StatusCode::kOk;
    const absl::Status status = manager_->End(pools_[p].id);
    Note(absl::StrCat("End(", Name(p), ") -> ", status.ToString()));
    Check(status.code() == expected, [&] {
      return absl::StrCat("End(", Name(p), ") returned ", status.ToString(), "; the model says ",
                          CodeName(expected));
    });
    ++counters_.ends;
    if (found == routes_.end()) {
      ++counters_.end_refusals;
      return;
    }
    routes_.erase(found);
    --pools_[p].routes;
  }

  void DoRelease() {
    // Mostly a pool with a reference that may go; sometimes any pool, to be refused.
    std::vector<int> releasable;
    for (int q = 0; q < kPools; ++q) {
      if (pools_[q].references > 0 && pools_[q].references - 1 >= pools_[q].routes) {
        releasable.push_back(q);
      }
    }
    int p;
    if (!releasable.empty() && random_() % 4 != 0) {
      p = releasable[random_() % releasable.size()];
    } else {
      p = static_cast<int>(random_() % (kPools + 2));
      if (p == kPools) p = random_() % 2 == 0 ? kDefault : kUnknown;
    }
    ModelPool& pool = pools_[p];
    // Keep pools from going away too often: each time a pool goes, its memory goes back, which
    // synchronizes the device.
    if (p < kPools && pool.references == 1 && pool.routes == 0 && random_() % 4 != 0) return;
    absl::StatusCode expected = absl::StatusCode::kOk;
    if (p == kDefault) {
      expected = absl::StatusCode::kInvalidArgument;
    } else if (!pool.known) {
      expected = absl::StatusCode::kNotFound;
    } else if (pool.references == 0) {
      expected = absl::StatusCode::kFailedPrecondition;
    } else if (pool.references - 1 < pool.routes) {
      expected = absl::StatusCode::kFailedPrecondition;  // fewer references than routes
    }
    const absl::Status status = manager_->Release(pool.id);
    Note(absl::StrCat("Release(", Name(p), ") -> ", status.ToString()));
    Check(status.code() == expected, [&] {
      return absl::StrCat("Release(", Name(p), ") returned ", status.ToString(),
                          "; the model says ", CodeName(expected), " (references ", pool.references,
                          ", routes ", pool.routes, ")");
    });
    ++counters_.releases;
    if (expected != absl::StatusCode::kOk) {
      ++counters_.release_refusals;
      return;
    }
    --pool.references;
    if (pool.references == 0) {
      if (Gone(p)) ++counters_.gone;
      if (Gone(p) && !Quiet()) pool.went_in_capture = true;
      // Its free memory went back at once (once the captures are over, during capture).
      if (Gone(p) && Quiet()) CheckHoldsNothing(p, "a pool released with no live block");
    }
  }

  void DoTrim() {
    int p = static_cast<int>(random_() % (kUnknown + 1));
    // Now and then a graph pool: mostly one something may still hold, else any.
    if (pools_.size() > kFirstGraphPool && random_() % 3 == 0) {
      p = !watched_graph_pools_.empty() && random_() % 4 != 0
              ? watched_graph_pools_[random_() % watched_graph_pools_.size()]
              : kFirstGraphPool + static_cast<int>(random_() % (pools_.size() - kFirstGraphPool));
    }
    const ModelPool& pool = pools_[p];
    absl::StatusCode expected = absl::StatusCode::kOk;
    if (!pool.known) {
      expected = absl::StatusCode::kNotFound;
    } else if (pool.graph && pool.references > 0) {
      expected = absl::StatusCode::kFailedPrecondition;  // a graph may replay into its memory
    } else if (!Quiet()) {
      expected = absl::StatusCode::kFailedPrecondition;  // nothing goes back during capture
    }
    const size_t used_before = device_->used_bytes();
    const absl::Status status = manager_->Trim(pool.id);
    Note(absl::StrCat("Trim(", Name(p), ") -> ", status.ToString()));
    Check(status.code() == expected, [&] {
      return absl::StrCat("Trim(", Name(p), ") returned ", status.ToString(), "; the model says ",
                          CodeName(expected), " (", captures_.size(), " captures underway)");
    });
    ++counters_.trims;
    if (expected == absl::StatusCode::kFailedPrecondition) {
      if (pool.graph && pool.references > 0) {
        ++counters_.trim_refusals_graph;
      } else {
        ++counters_.trim_refusals_capture;
      }
      Check(device_->used_bytes() == used_before, "a refused Trim gave memory back");
      CheckGraphPoolsKeepMemory();
      return;
    }
    if (pool.known && pool.live == 0) CheckHoldsNothing(p, "a trimmed pool");
  }

  void DoEmptyCache() {
    const size_t used_before = device_->used_bytes();
    const absl::Status status = allocator_->EmptyCache();
    Note(absl::StrCat("EmptyCache() -> ", status.ToString()));
    ++counters_.empty_caches;
    if (!Quiet()) {
      Check(status.code() == absl::StatusCode::kFailedPrecondition, [&] {
        return absl::StrCat("EmptyCache during capture returned ", status.ToString(),
                            "; the model says FAILED_PRECONDITION");
      });
      Check(device_->used_bytes() == used_before, "a refused EmptyCache gave memory back");
      ++counters_.empty_cache_refusals;
      return;
    }
    Check(status.ok(), [&] { return absl::StrCat("EmptyCache failed: ", status.ToString()); });
    for (int p = 0; p <= kDefault; ++p) {
      if (pools_[p].known && pools_[p].live == 0) CheckHoldsNothing(p, "after EmptyCache, a pool");
    }
    CheckGraphPoolsKeepMemory();
  }

  // --- Captures -------------------------------------------------------------------------------

  struct RunningCapture {
    std::unique_ptr<graph::Capture> capture;
    int pool = 0;    // model index
    int stream = 0;  // the stream it was begun on
    uint64_t id = 0;  // the device's capture id
    bool invalidated = false;
  };
  struct LiveGraph {
    std::unique_ptr<graph::Graph> graph;
    int pool = 0;
  };
  struct HeldSharedPool {
    std::unique_ptr<graph::SharedPool> handle;
    int pool = 0;
  };
  // Which capture a stream takes part in (0: none), as the device has it.
  struct StreamCapture {
    uint64_t id = 0;
    bool invalidated = false;
  };

  const RunningCapture& CaptureById(uint64_t id) {
    for (const RunningCapture& capture : captures_) {
      if (capture.id == id) return capture;
    }
    Fail(absl::StrCat("the model lost capture ", id));  // throws
    std::abort();
  }

  // A new graph pool in the model, with no reference yet.
  int NewGraphPool(PoolId id) {
    for (int q : watched_graph_pools_) {
      Check(pools_[q].id != id,
            [&] { return absl::StrCat("a new graph pool has the id of ", Name(q)); });
    }
    ModelPool pool;
    pool.id = id;
    pool.known = true;
    pool.generation = 1;
    pool.graph = true;
    pools_.push_back(pool);
    const int p = static_cast<int>(pools_.size()) - 1;
    watched_graph_pools_.push_back(p);
    Check(id.first != 0 && id.second == 0, [&] {
      return absl::StrCat("a graph pool has id ", id.ToString(), ", which is not a graph pool id");
    });
    const AllocatorStats fresh = PoolStats(p);
    Check(fresh.active_blocks.added == 0 && fresh.reserved_bytes.current == 0,
          [&] { return absl::StrCat(Name(p), " is new but has statistics"); });
    return p;
  }

  void DropGraphPoolReference(int p) {
    ModelPool& pool = pools_[p];
    --pool.references;
    if (pool.references > 0) return;
    released_graph_pools_.push_back(p);
    if (Gone(p) && !Quiet()) pool.went_in_capture = true;
    if (Gone(p) && Quiet()) CheckHoldsNothing(p, "a graph pool released with no live block");
  }

  void DoCaptureOp() {
    // Captures end more often than they begin, so that about half the operations run with none
    // underway (and EmptyCache, Trim and pools going are checked both ways).
    const uint64_t dice = random_() % 100;
    if (dice < 26) return DoCaptureBegin();
    if (dice < 80 && captures_.empty()) return;  // nothing to join, end or invalidate
    if (dice < 36) return DoJoin();
    if (dice < 64) return FinishCapture(random_() % captures_.size(), kEndIt);
    if (dice < 74) {
      // Two draws, in this order (as arguments of one call their order would be the compiler's).
      const size_t index = random_() % captures_.size();
      return FinishCapture(index, random_() % 3 == 0 ? kDestroyIt : kAbandonIt);
    }
    if (dice < 80) return DoInvalidate();
    if (dice < 90) return DoLaunch();
    if (dice < 96) return DoDestroyGraph();
    return DoSharedPoolOp();
  }

  void DoCaptureBegin() {
    if (captures_.size() >= kMaxCaptures) {
      const size_t index = random_() % captures_.size();
      return FinishCapture(index, random_() % 4 == 0 ? kAbandonIt : kEndIt);
    }
    // Mostly a stream that is not capturing; now and then one that is, to be refused.
    int s = static_cast<int>(random_() % kStreams);
    if (random_() % 8 != 0) {
      for (int tries = 0; tries < 8 && stream_capture_[s].id != 0; ++tries) {
        s = static_cast<int>(random_() % kStreams);
      }
    }
    // Which pool: a new private one, or one to share, or one that cannot be shared.
    enum Kind { kPrivate, kShareGraph, kShareHandle, kShareCapture, kNotGraph, kUnknownId,
                kReleased };
    Kind kind = kPrivate;
    int shared = -1;
    graph::CaptureOptions options;
    const uint64_t pick = random_() % 100;
    if (pick < 36) {
      kind = kPrivate;
    } else if (pick < 60) {
      if (!graphs_.empty()) {
        kind = kShareGraph;
        const LiveGraph& g = graphs_[random_() % graphs_.size()];
        shared = g.pool;
        options.pool = g.graph->pool();
      }
    } else if (pick < 77) {
      if (!shared_pools_.empty()) {
        kind = kShareHandle;
        const HeldSharedPool& h = shared_pools_[random_() % shared_pools_.size()];
        shared = h.pool;
        options.pool = h.handle->id();
      }
    } else if (pick < 90) {
      if (!captures_.empty()) {
        kind = kShareCapture;
        const RunningCapture& c = captures_[random_() % captures_.size()];
        shared = c.pool;
        options.pool = c.capture->pool();
      }
    } else if (pick < 94) {
      kind = kNotGraph;  // a user pool's id, known or not
      options.pool = pools_[random_() % 2 == 0 ? kUnknown : random_() % kPools].id;
    } else if (pick < 97 || released_graph_pools_.empty()) {
      kind = kUnknownId;
      options.pool = NewGraphPoolId();
    } else {
      kind = kReleased;
      options.pool = pools_[released_graph_pools_[random_() % released_graph_pools_.size()]].id;
    }
    // In Begin's order: the id, then the device (a stream capturing already), then whether the
    // pool to share is held (checked and begun as one step, once the device capture runs).
    absl::StatusCode expected = absl::StatusCode::kOk;
    bool busy = false;
    if (kind == kNotGraph) {
      expected = absl::StatusCode::kInvalidArgument;
    } else if (stream_capture_[s].id != 0) {
      expected = absl::StatusCode::kFailedPrecondition;
      busy = true;
    } else if (kind == kUnknownId) {
      expected = absl::StatusCode::kNotFound;
    } else if (kind == kReleased) {
      expected = absl::StatusCode::kFailedPrecondition;
    }
    absl::StatusOr<graph::Capture> begun =
        graph::Capture::Begin(device_.get(), manager_.get(), streams_[s], options);
    Note(absl::StrCat("Capture::Begin(stream ", s, ", pool ", options.pool.ToString(), ") -> ",
                      begun.ok() ? absl::StrCat("capture ", begun->capture_id(), " into ",
                                                begun->pool().ToString())
                                 : begun.status().ToString()));
    Check(begun.status().code() == expected, [&] {
      return absl::StrCat("Capture::Begin on stream ", s, " into ", options.pool.ToString(),
                          " returned ", begun.status().ToString(), "; the model says ",
                          CodeName(expected));
    });
    if (!begun.ok()) {
      if (busy) {
        ++counters_.busy_stream_refusals;
      } else if (kind == kNotGraph) {
        ++counters_.not_graph_pool_refusals;
      } else if (kind == kUnknownId) {
        ++counters_.unknown_pool_refusals;
      } else {
        ++counters_.released_pool_refusals;
      }
      return;  // and CheckInfo: nothing was left behind
    }
    ++counters_.capture_begins;
    Check(begun->active() && begun->stream() == streams_[s], "a capture begun is not active");
    int p = shared;
    if (kind == kPrivate) {
      ++counters_.private_pools;
      p = NewGraphPool(begun->pool());
    } else {
      if (kind == kShareGraph) ++counters_.shared_graph_pools;
      if (kind == kShareHandle) ++counters_.shared_handle_pools;
      if (kind == kShareCapture) ++counters_.shared_capture_pools;
      Check(begun->pool() == pools_[p].id, [&] {
        return absl::StrCat("a capture sharing ", Name(p), " uses ", begun->pool().ToString());
      });
    }
    ++pools_[p].references;
    ++pools_[p].routes;
    ModelRoute route;
    route.kind = RouteFilter::Kind::kCapture;
    route.capture = begun->capture_id();
    route.pool = p;
    route.sequence = next_sequence_++;
    routes_.push_back(route);
    stream_capture_[s] = StreamCapture{begun->capture_id(), false};
    RunningCapture capture;
    capture.capture = std::make_unique<graph::Capture>(*std::move(begun));
    capture.pool = p;
    capture.stream = s;
    capture.id = route.capture;
    captures_.push_back(std::move(capture));
    burst_capture_ = route.capture;
    burst_left_ = 8 + static_cast<int>(random_() % 33);
  }

  // A burst of work on one capture's streams, right after it began (before routes begun later
  // override it): allocations, frees and RecordStream in its pool, and streams joining it. Each
  // step is one operation, checked as any other.
  bool DoBurstStep() {
    size_t index = 0;
    while (index < captures_.size() && captures_[index].id != burst_capture_) ++index;
    if (index == captures_.size()) {
      burst_left_ = 0;
      return false;
    }
    const int pool = captures_[index].pool;
    std::vector<int> in;
    for (int s = 0; s < kStreams; ++s) {
      if (stream_capture_[s].id == burst_capture_) in.push_back(s);
    }
    const uint64_t dice = random_() % 100;
    if (dice < 50 || live_.empty()) {
      DoAllocate(in[random_() % in.size()]);
    } else if (dice < 78) {
      DoFree(pool);
    } else if (dice < 93) {
      DoRecordStream(pool);
    } else if (dice < 97) {
      DoJoin(index);
    } else {
      const int s = in[random_() % in.size()];
      enqueued_[s] = device_->Enqueue(streams_[s]);
      Note(absl::StrCat("Enqueue(stream ", s, ") -> ", enqueued_[s]));
    }
    return true;
  }

  void DoJoin(size_t index = SIZE_MAX) {
    if (index == SIZE_MAX) index = random_() % captures_.size();
    const RunningCapture& c = captures_[index];
    std::vector<int> idle;
    for (int s = 0; s < kStreams; ++s) {
      if (stream_capture_[s].id == 0) idle.push_back(s);
    }
    if (idle.empty()) return;
    const int s = idle[random_() % idle.size()];
    Check(stream_capture_[c.stream].id == c.id, "the model lost a capture's own stream");
    device_->JoinCapture(streams_[s], streams_[c.stream]);
    Note(absl::StrCat("JoinCapture(stream ", s, " to capture ", c.id, " on stream ", c.stream,
                      c.invalidated ? ", invalidated)" : ")"));
    stream_capture_[s] = stream_capture_[c.stream];
    ++counters_.joins;
  }

  void DoInvalidate() {
    std::vector<size_t> valid;
    for (size_t i = 0; i < captures_.size(); ++i) {
      if (!captures_[i].invalidated) valid.push_back(i);
    }
    if (valid.empty()) return;
    RunningCapture& c = captures_[valid[random_() % valid.size()]];
    device_->InvalidateCapture(streams_[c.stream]);
    Note(absl::StrCat("InvalidateCapture(capture ", c.id, " on stream ", c.stream, ")"));
    c.invalidated = true;
    for (StreamCapture& sc : stream_capture_) {
      if (sc.id == c.id) sc.invalidated = true;
    }
    ++counters_.invalidations;
  }

  enum Finish { kEndIt, kAbandonIt, kDestroyIt };

  void FinishCapture(size_t index, Finish how) {
    if (how == kEndIt && graphs_.size() >= kMaxGraphs) DoDestroyGraph();
    RunningCapture& c = captures_[index];
    const int p = c.pool;
    std::unique_ptr<graph::Graph> made;
    if (how == kEndIt) {
      absl::StatusOr<graph::Graph> graph = c.capture->End();
      Note(absl::StrCat("End(capture ", c.id, " on stream ", c.stream, " into ", Name(p),
                        c.invalidated ? ", invalidated) -> " : ") -> ",
                        graph.ok() ? "a graph" : graph.status().ToString()));
      // The device fails the end of an invalidated capture (INTERNAL); End passes its code on.
      const absl::StatusCode expected =
          c.invalidated ? absl::StatusCode::kInternal : absl::StatusCode::kOk;
      Check(graph.status().code() == expected, [&] {
        return absl::StrCat("End of capture ", c.id, " returned ", graph.status().ToString(),
                            "; the model says ", CodeName(expected));
      });
      if (graph.ok()) {
        Check(graph->valid() && graph->pool() == pools_[p].id, [&] {
          return absl::StrCat("the graph of a capture into ", Name(p), " holds ",
                              graph->pool().ToString());
        });
        made = std::make_unique<graph::Graph>(*std::move(graph));
        ++counters_.graphs_made;
      } else {
        ++counters_.failed_ends;
      }
    } else if (how == kAbandonIt) {
      const absl::Status status = c.capture->Abandon();
      Note(absl::StrCat("Abandon(capture ", c.id, " on stream ", c.stream, " into ", Name(p),
                        c.invalidated ? ", invalidated) -> " : ") -> ", status.ToString()));
      Check(status.ok(), [&] { return absl::StrCat("Abandon failed: ", status.ToString()); });
      ++counters_.abandons;
    } else {
      Note(absl::StrCat("~Capture(capture ", c.id, " on stream ", c.stream, " into ", Name(p),
                        c.invalidated ? ", invalidated)" : ")"));
      c.capture.reset();  // abandons it
      ++counters_.abandons;
      ++counters_.destroyed_captures;
    }
    if (c.capture != nullptr) {
      Check(!c.capture->active(), "a capture is still active after End or Abandon");
      if (random_() % 8 == 0) {
        // Over is over: a second End is refused, a second Abandon does nothing.
        Check(c.capture->End().status().code() == absl::StatusCode::kFailedPrecondition,
              "a second End of a capture was not refused");
        Check(c.capture->Abandon().ok(), "Abandon of an ended capture failed");
      }
    }
    // The model: the capture's own route goes, and its streams stop capturing.
    auto route = std::find_if(routes_.begin(), routes_.end(), [&](const ModelRoute& r) {
      return r.kind == RouteFilter::Kind::kCapture && r.capture == c.id;
    });
    Check(route != routes_.end(), "the model lost a capture's route");
    routes_.erase(route);
    --pools_[p].routes;
    for (StreamCapture& sc : stream_capture_) {
      if (sc.id == c.id) sc = StreamCapture{};
    }
    captures_[index] = std::move(captures_.back());
    captures_.pop_back();
    if (made != nullptr) {
      graphs_.push_back(LiveGraph{std::move(made), p});  // the graph keeps the reference
    } else {
      DropGraphPoolReference(p);
    }
    if (Quiet()) CapturesOver();
  }

  // The last capture is over: the deferred frees' events are recorded now, and what went during
  // the captures gives its memory back.
  void CapturesOver() {
    oracle_->EndCaptureEpoch(enqueued_);
    std::vector<int> candidates = watched_graph_pools_;
    for (int p = 0; p < kPools; ++p) candidates.push_back(p);
    for (int p : candidates) {
      if (!Gone(p)) continue;
      CheckHoldsNothing(p, "once the captures were over, a pool that went");
      if (pools_[p].went_in_capture) ++counters_.pools_freed_after_capture;
      pools_[p].went_in_capture = false;
    }
  }

  void DoLaunch() {
    if (graphs_.empty()) return DoCaptureBegin();
    const LiveGraph& g = graphs_[random_() % graphs_.size()];
    const int s = static_cast<int>(random_() % kStreams);
    const absl::Status status = g.graph->Launch(streams_[s]);
    Note(absl::StrCat("Launch(graph of ", Name(g.pool), ", stream ", s, ") -> ",
                      status.ToString()));
    Check(status.ok(), [&] { return absl::StrCat("Launch failed: ", status.ToString()); });
    ++enqueued_[s];  // a replay is one unit of work on the stream
    ++counters_.launches;
  }

  void DoDestroyGraph() {
    if (graphs_.empty()) return;
    const size_t index = random_() % graphs_.size();
    LiveGraph& g = graphs_[index];
    const int p = g.pool;
    if (random_() % 3 != 0) {
      const absl::Status status = g.graph->Reset();
      Note(absl::StrCat("Reset(graph of ", Name(p), ") -> ", status.ToString()));
      Check(status.ok(), [&] { return absl::StrCat("Graph::Reset failed: ", status.ToString()); });
      Check(!g.graph->valid(), "a graph is valid after Reset");
      if (random_() % 4 == 0) {
        Check(g.graph->Reset().ok(), "a second Graph::Reset failed");
        Check(g.graph->Launch(streams_[0]).code() == absl::StatusCode::kFailedPrecondition,
              "Launch of a reset graph was not refused");
      }
      ++counters_.graph_resets;
    } else {
      Note(absl::StrCat("~Graph(graph of ", Name(p), ")"));
      g.graph.reset();
      ++counters_.destroyed_graphs;
    }
    graphs_[index] = std::move(graphs_.back());
    graphs_.pop_back();
    DropGraphPoolReference(p);
  }

  void DoSharedPoolOp(bool may_create = true) {
    if (may_create && shared_pools_.size() < kMaxSharedPools &&
        (shared_pools_.empty() || random_() % 2 == 0)) {
      absl::StatusOr<graph::SharedPool> made = graph::SharedPool::Create(manager_.get());
      Note(absl::StrCat("SharedPool::Create() -> ",
                        made.ok() ? made->id().ToString() : made.status().ToString()));
      Check(made.ok(),
            [&] { return absl::StrCat("SharedPool::Create failed: ", made.status().ToString()); });
      const int p = NewGraphPool(made->id());
      pools_[p].references = 1;
      shared_pools_.push_back(
          HeldSharedPool{std::make_unique<graph::SharedPool>(*std::move(made)), p});
      ++counters_.shared_creates;
      return;
    }
    const size_t index = random_() % shared_pools_.size();
    HeldSharedPool& h = shared_pools_[index];
    const int p = h.pool;
    if (random_() % 2 == 0) {
      const absl::Status status = h.handle->Reset();
      Note(absl::StrCat("SharedPool::Reset(", Name(p), ") -> ", status.ToString()));
      Check(status.ok(),
            [&] { return absl::StrCat("SharedPool::Reset failed: ", status.ToString()); });
      Check(h.handle->Reset().ok(), "a second SharedPool::Reset failed");
    } else {
      Note(absl::StrCat("~SharedPool(", Name(p), ")"));
      h.handle.reset();
    }
    shared_pools_[index] = std::move(shared_pools_.back());
    shared_pools_.pop_back();
    DropGraphPoolReference(p);
    ++counters_.shared_resets;
  }

  // --- Checks ---------------------------------------------------------------------------------

  AllocatorStats PoolStats(int p) {
    absl::StatusOr<AllocatorStats> stats = manager_->Stats(pools_[p].id);
    Check(stats.ok(),
          [&] { return absl::StrCat("Stats(", Name(p), ") failed: ", stats.status().ToString()); });
    return *stats;
  }

  void CheckHoldsNothing(int p, const char* what) {
    const AllocatorStats stats = PoolStats(p);
    // Address ranges (segments with nothing mapped) may stay; memory may not.
    Check(stats.reserved_bytes.current == 0, [&] {
      return absl::StrCat(what, " with no live block still holds memory: ", Name(p), " has ",
                          stats.reserved_bytes.current, " bytes in ", stats.segments.current,
                          " segments");
    });
  }

  void CheckPoolStats(int p) {
    const ModelPool& pool = pools_[p];
    const AllocatorStats stats = PoolStats(p);
    Check(stats.active_blocks.current == pool.live &&
              stats.requested_bytes.current == pool.requested &&
              stats.allocated_bytes.current == pool.allocated,
          [&] {
            return absl::StrCat("Stats(", Name(p), "): ", stats.active_blocks.current, " blocks, ",
                                stats.requested_bytes.current, " requested, ",
                                stats.allocated_bytes.current, " allocated; the model says ",
                                pool.live, ", ", pool.requested, ", ", pool.allocated);
          });
    if (Gone(p) && Quiet()) CheckHoldsNothing(p, "a gone pool");
  }

  void CheckInfo() {
    for (int p = 0; p <= kUnknown; ++p) CheckInfoOf(p);
    // Graph pools, until they are gone for good (nothing holds them, no live block, and no
    // capture underway to hold their memory back).
    for (size_t i = 0; i < watched_graph_pools_.size();) {
      const int p = watched_graph_pools_[i];
      CheckInfoOf(p);
      if (Gone(p) && Quiet()) {
        CheckHoldsNothing(p, "a graph pool that nothing holds, with no live block,");
        ++counters_.graph_pools_gone;
        watched_graph_pools_[i] = watched_graph_pools_.back();
        watched_graph_pools_.pop_back();
        continue;
      }
      ++i;
    }
    Check(allocator_->captures_underway() == static_cast<int>(captures_.size()), [&] {
      return absl::StrCat("captures_underway() is ", allocator_->captures_underway(),
                          "; the model has ", captures_.size(), " captures running");
    });
    Check(device_->capture_violations() == 0,
          "an event was queried or something synchronized during a capture");
    Check(device_->live_graphs() == static_cast<int64_t>(graphs_.size()), [&] {
      return absl::StrCat("the device has ", device_->live_graphs(), " graphs; the model has ",
                          graphs_.size(), " Graphs alive");
    });
    if (!Quiet()) ++counters_.ops_in_capture;
  }

  void CheckInfoOf(int p) {
    const ModelPool& pool = pools_[p];
    absl::StatusOr<PoolInfo> info = manager_->Info(pool.id);
    if (!pool.known) {
      Check(absl::IsNotFound(info.status()),
            [&] { return absl::StrCat("Info(", Name(p), ") should be NOT_FOUND"); });
      return;
    }
    Check(info.ok(),
          [&] { return absl::StrCat("Info(", Name(p), ") failed: ", info.status().ToString()); });
    const bool released = p != kDefault && pool.references == 0;
    Check(info->references == pool.references && info->routes == pool.routes &&
              info->live_blocks == pool.live && info->released == released,
          [&] {
            return absl::StrCat("Info(", Name(p), "): references ", info->references, ", routes ",
                                info->routes, ", live ", info->live_blocks,
                                info->released ? ", released" : "", "; the model says ",
                                pool.references, ", ", pool.routes, ", ", pool.live,
                                released ? ", released" : "");
          });
  }

  // A graph pool something holds never gives memory back: a graph may replay into any of it.
  void CheckGraphPoolsKeepMemory() {
    for (int p : watched_graph_pools_) {
      ModelPool& pool = pools_[p];
      if (pool.references == 0) continue;
      const int64_t reserved = PoolStats(p).reserved_bytes.current;
      Check(reserved >= pool.reserved_floor, [&] {
        return absl::StrCat(Name(p), ", held by ", pool.references,
                            " graphs, captures or SharedPools, gave memory back: ", reserved,
                            " bytes reserved, ", pool.reserved_floor, " before");
      });
      pool.reserved_floor = reserved;
    }
  }

  void CheckRoutes() {
    for (int s = 0; s < kStreams; ++s) {
      const int expected = Predict(s);
      absl::StatusOr<PoolId> route = manager_->RouteOf(streams_[s]);
      ++counters_.route_checks;
      Check(route.ok() && *route == pools_[expected].id, [&] {
        return absl::StrCat("RouteOf(stream ", s, ") is ",
                            route.ok() ? route->ToString() : route.status().ToString(),
                            "; the model says ", Name(expected));
      });
    }
  }

  // The snapshot of one pool lists exactly that pool's live blocks.
  void CheckSnapshot(int p) {
    if (!pools_[p].known) return;
    absl::StatusOr<std::string> snapshot = manager_->Snapshot(pools_[p].id);
    Check(snapshot.ok(), "Snapshot failed");
    ++counters_.snapshots;
    std::set<uintptr_t> listed;
    const std::string key = "{\"address\":";
    const std::string allocated = "\"state\":\"allocated\"";
    for (size_t at = snapshot->find(key); at != std::string::npos;
         at = snapshot->find(key, at + 1)) {
      const size_t close = snapshot->find('}', at);
      const std::string entry = snapshot->substr(at, close - at);
      if (entry.find(allocated) == std::string::npos) continue;
      listed.insert(std::strtoull(entry.c_str() + key.size(), nullptr, 10));
    }
    std::set<uintptr_t> expected;
    for (const LiveBlock& block : live_) {
      if (block.pool == p) expected.insert(block.address);
    }
    Check(listed == expected, [&] {
      return absl::StrCat("Snapshot(", Name(p), ") lists ", listed.size(),
                          " allocated blocks; the model has ", expected.size(), " live");
    });
  }

  void Teardown() {
    Note("teardown");
    // Free everything, with the captures still running (deferred frees among them), then end the
    // captures and drop every graph and SharedPool.
    while (!live_.empty()) DoFree();
    while (!captures_.empty()) {
      FinishCapture(captures_.size() - 1, random_() % 2 == 0 ? kEndIt : kAbandonIt);
    }
    while (!graphs_.empty()) DoDestroyGraph();
    while (!shared_pools_.empty()) DoSharedPoolOp(/*may_create=*/false);
    // End every route, newest first, through the manager's own rule.
    while (!routes_.empty()) {
      const int p = routes_.back().pool;
      const size_t before = routes_.size();
      DoEndOf(p);
      Check(routes_.size() == before - 1, "End did not end a route at teardown");
    }
    for (int p = 0; p < kPools; ++p) {
      while (pools_[p].references > 0) {
        const absl::Status status = manager_->Release(pools_[p].id);
        Check(status.ok(),
              [&] { return absl::StrCat("Release at teardown: ", status.ToString()); });
        --pools_[p].references;
      }
    }
    CheckInfo();
    for (int p = 0; p < kPools; ++p) {
      if (pools_[p].known) CheckHoldsNothing(p, "at teardown, a released pool");
    }
    Check(watched_graph_pools_.empty(), "a graph pool is not gone at teardown");
    for (int p = kFirstGraphPool; p < static_cast<int>(pools_.size()); ++p) {
      CheckInfoOf(p);
      Check(pools_[p].references == 0, "the model holds a graph pool at teardown");
      CheckHoldsNothing(p, "at teardown, a graph pool");
    }
    Check(allocator_->captures_underway() == 0, "a capture is underway at teardown");
    device_->CompleteAll();
    Check(allocator_->EmptyCache().ok(), "EmptyCache at teardown failed");
    Check(device_->used_bytes() == 0,
          [&] { return absl::StrCat("the device still holds ", device_->used_bytes(), " bytes"); });
    Check(device_->live_segments() == 0, [&] {
      return absl::StrCat("the device still holds ", device_->live_segments(), " segments");
    });
    Check(allocator_->GetStats().active_blocks.current == 0, "live blocks after teardown");
    Check(device_->capture_violations() == 0, "an event was queried during a capture");
    Check(device_->live_graphs() == 0, [&] {
      return absl::StrCat("the device still holds ", device_->live_graphs(), " graphs");
    });
    // The allocator keeps spare events for reuse; they go with it.
    const int64_t events = device_->live_events();
    manager_.reset();
    allocator_.reset();
    Check(device_->live_events() == 0, [&] {
      return absl::StrCat(device_->live_events(), " events outlived the allocator (", events,
                          " before it was destroyed)");
    });
  }

  void DoEndOf(int p) {
    // As DoEnd, for a given pool.
    auto found = routes_.end();
    for (auto it = routes_.rbegin(); it != routes_.rend(); ++it) {
      if (it->pool == p && it->kind == RouteFilter::Kind::kCurrentThread) {
        found = std::next(it).base();
        break;
      }
    }
    if (found == routes_.end()) {
      for (auto it = routes_.rbegin(); it != routes_.rend(); ++it) {
        if (it->pool == p) {
          found = std::next(it).base();
          break;
        }
      }
    }
    const absl::Status status = manager_->End(pools_[p].id);
    Check(status.ok(),
          [&] { return absl::StrCat("End(", Name(p), ") at teardown: ", status.ToString()); });
    routes_.erase(found);
    --pools_[p].routes;
  }

  const bool expandable_;
  const uint64_t seed_;
  const int64_t ops_;
  std::mt19937_64 random_;
  std::unique_ptr<SimulatedDevice> device_;
  std::optional<ReuseOracle> oracle_;  // made once the streams are
  std::unique_ptr<CachingAllocator> allocator_;
  std::unique_ptr<PoolManager> manager_;
  std::array<Stream, kStreams> streams_{};
  std::array<StreamId, kStreams> stream_ids_{};
  std::array<uint64_t, kStreams> enqueued_{};
  std::vector<ModelPool> pools_ = std::vector<ModelPool>(kUnknown + 1);
  std::vector<ModelRoute> routes_;  // oldest first
  uint64_t next_sequence_ = 1;
  std::vector<LiveBlock> live_;
  int64_t op_ = 0;
  int64_t checks_ = 0;
  Counters counters_;
  std::deque<std::string> history_;
  // Captures, graphs and SharedPools (after manager_: they go first).
  std::array<StreamCapture, kStreams> stream_capture_{};
  std::vector<RunningCapture> captures_;
  std::vector<LiveGraph> graphs_;
  std::vector<HeldSharedPool> shared_pools_;
  std::vector<int> watched_graph_pools_;   // graph pools not gone for good
  std::vector<int> released_graph_pools_;  // graph pools nothing holds any more
  // A burst of work on one capture's streams (DoBurstStep): its capture id, steps left.
  uint64_t burst_capture_ = 0;
  int burst_left_ = 0;
};

TEST_CASE("a million random pool operations agree with the model of routing and references") {
  const bool expandable = GENERATE(true, false);
  const uint64_t seed = testing::SeedFromEnvironment(20240707 + (expandable ? 0 : 1));
  const int64_t ops = testing::OpsFromEnvironment(expandable ? 1000000 : 250000);
  INFO("expandable_segments=" << expandable << " seed=" << seed);
  PoolDifferentialRun run(expandable, seed, ops);
  run.Run();
}

// ------------------------------------------------------------------------------------------------
// Four threads.
//
// Each thread has two streams and two pools of its own, which it routes with current-thread
// routes and with stream routes on its own streams; the model of those is exact, because no
// other thread's route can match its allocations (nobody routes "everyone" here). All threads
// also enter and leave scopes on one shared pool (Begin + End + Release, nested up to twice), so
// that pool is retired, revived and begun afresh under them all the time; its counts are checked
// at the end. Blocks of the shared and default pools are handed to other threads to free. The
// odd-numbered threads exit with current-thread routes (and the references they took) still
// open; the even ones end and release everything.

constexpr int kThreads = 4;
constexpr int kOwnPools = 2;
constexpr int kShared = kOwnPools;        // thread-local index of the shared pool
constexpr int kThreadDefault = kOwnPools + 1;

struct SharedBlock {
  void* ptr = nullptr;
  PoolId pool;
};

struct ThreadShared {
  std::mutex mu;
  std::vector<SharedBlock> handed_over;  // blocks any thread may free
};

struct ThreadResult {
  int64_t allocations = 0;
  int64_t routed = 0;
  int64_t shared_allocations = 0;
  int64_t handed_frees = 0;
  int64_t refusals = 0;
  std::vector<std::string> errors;
  // What Info of each own pool must say once the thread has exited.
  std::array<PoolInfo, kOwnPools> expected_after_exit{};
  std::array<bool, kOwnPools> known{};
};

struct ThreadPoolModel {
  PoolId id;
  bool known = false;
  int64_t references = 0;
  int64_t routes = 0;
  int64_t live = 0;
};

struct ThreadBlock {
  void* ptr = nullptr;
  int pool = 0;  // thread-local index
  int stream = 0;
};

void ThreadBody(int t, uint64_t seed, int ops, SimulatedDevice& device, PoolManager& manager,
                CachingAllocator& allocator, PoolId shared_pool, const std::array<PoolId, kOwnPools>& own_ids,
                ThreadShared& shared, ThreadResult& result) {
  std::mt19937_64 random(seed);
  int op = 0;
  auto error = [&](const std::string& what) {
    if (result.errors.size() < 10) {
      result.errors.push_back(absl::StrCat("thread ", t, " (seed ", seed, ") op ", op, ": ", what));
    }
  };
  std::array<Stream, 2> streams{};
  std::array<StreamId, 2> stream_ids{};
  for (int s = 0; s < 2; ++s) {
    streams[s] = device.CreateStream().value_or(nullptr);
    stream_ids[s] = device.GetStreamId(streams[s]).value_or(0);
  }
  std::array<ThreadPoolModel, kOwnPools> own;
  for (int p = 0; p < kOwnPools; ++p) own[p].id = own_ids[p];
  std::vector<ModelRoute> routes;  // this thread's routes, oldest first
  int shared_depth = 0;
  std::vector<ThreadBlock> live;
  auto id_of = [&](int p) {
    return p < kOwnPools ? own[p].id : p == kShared ? shared_pool : kDefaultPool;
  };
  auto predict = [&](int s) {
    for (auto it = routes.rbegin(); it != routes.rend(); ++it) {
      if (it->kind == RouteFilter::Kind::kCurrentThread || it->stream == s) return it->pool;
    }
    return kThreadDefault;
  };
  auto end_route = [&](int p, bool expect_ok) {
    auto found = routes.end();
    for (auto it = routes.rbegin(); it != routes.rend(); ++it) {
      if (it->pool == p && it->kind == RouteFilter::Kind::kCurrentThread) {
        found = std::next(it).base();
        break;
      }
    }
    if (found == routes.end()) {
      for (auto it = routes.rbegin(); it != routes.rend(); ++it) {
        if (it->pool == p) {
          found = std::next(it).base();
          break;
        }
      }
    }
    const absl::Status status = manager.End(id_of(p));
    const bool model_ok = found != routes.end();
    if (status.ok() != model_ok) {
      error(absl::StrCat("End(", id_of(p).ToString(), ") returned ", status.ToString(),
                         model_ok ? "; the model says OK" : "; the model says refused"));
    }
    if (!model_ok) {
      ++result.refusals;
      return;
    }
    if (!expect_ok) error("the model ended a route it should not have");
    if (p < kOwnPools) --own[p].routes;
    routes.erase(found);
  };
  auto check_own_info = [&] {
    for (int p = 0; p < kOwnPools; ++p) {
      absl::StatusOr<PoolInfo> info = manager.Info(own[p].id);
      if (!own[p].known) {
        if (!absl::IsNotFound(info.status())) error("Info of an unknown pool answered");
        continue;
      }
      if (!info.ok() || info->references != own[p].references || info->routes != own[p].routes ||
          info->live_blocks != own[p].live || info->released != (own[p].references == 0)) {
        error(absl::StrCat("Info(", own[p].id.ToString(), ") differs from the model: ",
                           info.ok() ? absl::StrCat(info->references, "/", info->routes, "/",
                                                    info->live_blocks)
                                     : info.status().ToString(),
                           " vs ", own[p].references, "/", own[p].routes, "/", own[p].live));
      }
    }
  };
  auto free_block = [&](size_t index) {
    const ThreadBlock block = live[index];
    live[index] = live.back();
    live.pop_back();
    absl::StatusOr<PoolId> of = manager.PoolOf(block.ptr);
    if (!of.ok() || *of != id_of(block.pool)) error("PoolOf of a live block changed");
    const absl::Status freed = allocator.Free(block.ptr);
    if (!freed.ok()) error(absl::StrCat("Free: ", freed.ToString()));
    if (block.pool < kOwnPools) --own[block.pool].live;
  };

  for (op = 0; op < ops && result.errors.empty(); ++op) {
    const uint64_t dice = random() % 1000;
    const int alloc_share = live.size() < 16 ? 650 : live.size() > 64 ? 250 : 450;
    if (live.empty() || dice < static_cast<uint64_t>(alloc_share)) {
      const int s = static_cast<int>(random() % 2);
      const int expected = predict(s);
      absl::StatusOr<PoolId> route = manager.RouteOf(streams[s]);
      if (!route.ok() || *route != id_of(expected)) {
        error(absl::StrCat("RouteOf is ", route.ok() ? route->ToString() : route.status().ToString(),
                           "; the model says ", id_of(expected).ToString()));
      }
      const size_t size = testing::RandomSize(random, kSizes) / 4 + 1;
      absl::StatusOr<void*> ptr = manager.Allocate(size, streams[s]);
      if (!ptr.ok()) {
        error(absl::StrCat("Allocate: ", ptr.status().ToString()));
        continue;
      }
      absl::StatusOr<PoolId> of = manager.PoolOf(*ptr);
      if (!of.ok() || *of != id_of(expected)) {
        error(absl::StrCat("the block landed in ", of.ok() ? of->ToString() : of.status().ToString(),
                           "; the model says ", id_of(expected).ToString()));
      }
      ++result.allocations;
      if (expected != kThreadDefault) ++result.routed;
      if (expected == kShared) ++result.shared_allocations;
      if (expected < kOwnPools) ++own[expected].live;
      live.push_back(ThreadBlock{*ptr, expected, s});
    } else if (dice < 750) {
      free_block(random() % live.size());
    } else if (dice < 780) {
      // Hand a block of the shared or the default pool to whichever thread comes next.
      const size_t index = random() % live.size();
      if (live[index].pool >= kOwnPools) {
        std::lock_guard<std::mutex> lock(shared.mu);
        shared.handed_over.push_back(SharedBlock{live[index].ptr, id_of(live[index].pool)});
        live[index] = live.back();
        live.pop_back();
      }
    } else if (dice < 810) {
      SharedBlock block;
      {
        std::lock_guard<std::mutex> lock(shared.mu);
        if (!shared.handed_over.empty()) {
          const size_t index = random() % shared.handed_over.size();
          block = shared.handed_over[index];
          shared.handed_over[index] = shared.handed_over.back();
          shared.handed_over.pop_back();
        }
      }
      if (block.ptr != nullptr) {
        absl::StatusOr<PoolId> of = manager.PoolOf(block.ptr);
        if (!of.ok() || *of != block.pool) error("PoolOf of a handed-over block changed");
        if (!allocator.Free(block.ptr).ok()) error("Free of a handed-over block failed");
        ++result.handed_frees;
      }
    } else if (dice < 840) {
      const int s = static_cast<int>(random() % 2);
      ThreadBlock& block = live[random() % live.size()];
      device.Enqueue(streams[s]);
      if (!allocator.RecordStream(block.ptr, streams[s]).ok()) error("RecordStream failed");
      if (random() % 2 == 0) device.Complete(streams[random() % 2]);
    } else if (dice < 870) {
      // Begin one of this thread's pools, for itself or for one of its streams.
      if (routes.size() >= 10) continue;
      const int p = static_cast<int>(random() % kOwnPools);
      ModelRoute route;
      route.pool = p;
      route.stream = -1;
      RouteFilter filter = RouteFilter::CurrentThread();
      if (random() % 3 == 0) {
        route.kind = RouteFilter::Kind::kStream;
        route.stream = static_cast<int>(random() % 2);
        filter = RouteFilter::OnStream(stream_ids[route.stream]);
      }
      const absl::Status status = manager.Begin(own[p].id, filter);
      if (!status.ok()) error(absl::StrCat("Begin: ", status.ToString()));
      own[p].known = true;
      ++own[p].references;
      ++own[p].routes;
      routes.push_back(route);
    } else if (dice < 920) {
      const int p = static_cast<int>(random() % kOwnPools);
      end_route(p, true);
    } else if (dice < 950) {
      const int p = static_cast<int>(random() % kOwnPools);
      ThreadPoolModel& pool = own[p];
      absl::StatusCode expected = absl::StatusCode::kOk;
      if (!pool.known) {
        expected = absl::StatusCode::kNotFound;
      } else if (pool.references == 0 || pool.references - 1 < pool.routes) {
        expected = absl::StatusCode::kFailedPrecondition;
      }
      const absl::Status status = manager.Release(pool.id);
      if (status.code() != expected) {
        error(absl::StrCat("Release(", pool.id.ToString(), ") returned ", status.ToString(),
                           "; the model says ", CodeName(expected)));
      }
      if (expected == absl::StatusCode::kOk) {
        --pool.references;
      } else {
        ++result.refusals;
      }
    } else if (dice < 975) {
      // Enter the shared pool's scope (nested up to twice).
      if (shared_depth == 2) continue;
      const absl::Status status = manager.Begin(shared_pool, RouteFilter::CurrentThread());
      if (!status.ok()) error(absl::StrCat("Begin(shared): ", status.ToString()));
      ModelRoute route;
      route.pool = kShared;
      route.stream = -1;
      routes.push_back(route);
      ++shared_depth;
    } else {
      // Leave it; with no scope open, End is refused (no other thread's route can be ended).
      if (shared_depth == 0) {
        end_route(kShared, false);
        continue;
      }
      end_route(kShared, true);
      const absl::Status status = manager.Release(shared_pool);
      if (!status.ok()) error(absl::StrCat("Release(shared) after End: ", status.ToString()));
      --shared_depth;
    }
    check_own_info();
  }

  // Teardown: free this thread's blocks; end the stream routes; the even threads end and
  // release everything, the odd ones exit with their current-thread routes open.
  while (!live.empty()) {
    if (t % 2 == 1 && live.back().pool >= kOwnPools && random() % 2 == 0) {
      std::lock_guard<std::mutex> lock(shared.mu);
      shared.handed_over.push_back(SharedBlock{live.back().ptr, id_of(live.back().pool)});
      live.pop_back();
      continue;
    }
    free_block(live.size() - 1);
  }
  // End's rule pops this thread's own current-thread route to the pool first, so a stream route
  // may take more than one End to reach.
  for (;;) {
    auto stream_route = std::find_if(routes.begin(), routes.end(), [](const ModelRoute& route) {
      return route.kind == RouteFilter::Kind::kStream;
    });
    if (stream_route == routes.end()) break;
    const int p = stream_route->pool;
    end_route(p, true);
  }
  if (t % 2 == 0) {
    while (!routes.empty()) {
      const int p = routes.back().pool;
      end_route(p, true);
      if (p == kShared) {
        if (!manager.Release(shared_pool).ok()) error("Release(shared) at teardown");
        --shared_depth;
      }
    }
    for (int p = 0; p < kOwnPools; ++p) {
      while (own[p].references > 0) {
        const absl::Status status = manager.Release(own[p].id);
        if (!status.ok()) error(absl::StrCat("Release at teardown: ", status.ToString()));
        --own[p].references;
      }
    }
  }
  check_own_info();
  for (int p = 0; p < kOwnPools; ++p) {
    // Thread exit ends each open current-thread route and drops one reference for it.
    int64_t open = 0;
    for (const ModelRoute& route : routes) open += route.pool == p ? 1 : 0;
    PoolInfo& expected = result.expected_after_exit[p];
    expected.references = std::max<int64_t>(0, own[p].references - open);
    expected.routes = 0;
    expected.live_blocks = 0;
    expected.released = expected.references == 0;
    result.known[p] = own[p].known;
  }
}

TEST_CASE("four threads with their own routes, and scopes on a shared pool, tear down cleanly") {
  const bool expandable = GENERATE(true, false);
  const uint64_t seed = testing::SeedFromEnvironment(4242 + (expandable ? 0 : 1));
  constexpr int kTotalOps = 200000;
  INFO("expandable_segments=" << expandable << " seed=" << seed);
  std::printf("pool threaded run: expandable_segments=%d seed=%" PRIu64 " threads=%d ops=%d\n",
              expandable ? 1 : 0, seed, kThreads, kTotalOps);
  std::fflush(stdout);

  SimulatedDevice::Options options;
  options.capacity = size_t{16} << 30;
  SimulatedDevice device(options);
  std::unique_ptr<CachingAllocator> allocator = MakeAllocator(&device, expandable);
  auto manager = std::make_unique<PoolManager>(allocator.get());
  const PoolId shared_pool = NewUserPoolId();
  std::array<std::array<PoolId, kOwnPools>, kThreads> own_ids;
  for (auto& ids : own_ids) {
    for (PoolId& id : ids) id = NewUserPoolId();
  }
  ThreadShared shared;
  std::vector<ThreadResult> results(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back(ThreadBody, t, seed * 1000 + static_cast<uint64_t>(t),
                         kTotalOps / kThreads, std::ref(device), std::ref(*manager),
                         std::ref(*allocator), shared_pool, std::cref(own_ids[t]),
                         std::ref(shared), std::ref(results[t]));
  }
  for (std::thread& thread : threads) thread.join();

  ThreadResult sum;
  for (const ThreadResult& r : results) {
    for (const std::string& e : r.errors) sum.errors.push_back(e);
    sum.allocations += r.allocations;
    sum.routed += r.routed;
    sum.shared_allocations += r.shared_allocations;
    sum.handed_frees += r.handed_frees;
    sum.refusals += r.refusals;
  }
  INFO(absl::StrJoin(sum.errors, "\n"));
  REQUIRE(sum.errors.empty());
  std::printf("pool threaded run done: %" PRId64 " allocations (%" PRId64 " routed, %" PRId64
              " in the shared pool), %" PRId64 " blocks freed by another thread, %" PRId64
              " refusals\n",
              sum.allocations, sum.routed, sum.shared_allocations, sum.handed_frees,
              sum.refusals);
  std::fflush(stdout);
  CHECK(sum.routed > kTotalOps / 10);
  CHECK(sum.shared_allocations > 0);
  CHECK(sum.handed_frees > 0);

  // Every thread's own pools are as the thread-exit rule says; then the leftovers are released.
  for (int t = 0; t < kThreads; ++t) {
    for (int p = 0; p < kOwnPools; ++p) {
      INFO("thread " << t << " pool " << own_ids[t][p].ToString());
      absl::StatusOr<PoolInfo> info = manager->Info(own_ids[t][p]);
      if (!results[t].known[p]) {
        CHECK(absl::IsNotFound(info.status()));
        continue;
      }
      REQUIRE(info.ok());
      const PoolInfo& expected = results[t].expected_after_exit[p];
      CHECK(info->routes == 0);
      CHECK(info->references == expected.references);
      CHECK(info->live_blocks == 0);
      CHECK(info->released == expected.released);
      for (int64_t i = 0; i < info->references; ++i) {
        CHECK(manager->Release(own_ids[t][p]).ok());
      }
      CHECK(manager->Info(own_ids[t][p])->released);
    }
  }
  // The shared pool: every scope was closed, by its thread or by that thread's exit.
  absl::StatusOr<PoolInfo> shared_info = manager->Info(shared_pool);
  REQUIRE(shared_info.ok());
  CHECK(shared_info->references == 0);
  CHECK(shared_info->routes == 0);
  CHECK(shared_info->released);
  // Blocks still handed over are in the pools they came from.
  for (const SharedBlock& block : shared.handed_over) {
    absl::StatusOr<PoolId> of = manager->PoolOf(block.ptr);
    REQUIRE(of.ok());
    CHECK(*of == block.pool);
    REQUIRE(allocator->Free(block.ptr).ok());
  }
  CHECK(manager->Info(shared_pool)->live_blocks == 0);
  CHECK(manager->Info(kDefaultPool)->routes == 0);
  CHECK(allocator->GetStats().active_blocks.current == 0);
  REQUIRE(allocator->EmptyCache().ok());
  CHECK(device.used_bytes() == 0);
  CHECK(device.live_segments() == 0);
}

}  // namespace
}  // namespace tidepool
