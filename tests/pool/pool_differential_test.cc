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
//     handed out by another;
//   * the snapshot of a pool lists exactly its live blocks (every 5,000 operations);
// and at the end everything is freed, every route ended and every reference released, the cache
// emptied, and the device must hold nothing.
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
#include <map>
#include <memory>
#include <mutex>
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
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"

namespace tidepool {
namespace {

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

uint64_t SeedFromEnvironment(uint64_t fallback) {
  const char* text = std::getenv("TIDEPOOL_TEST_SEED");
  if (text == nullptr || *text == '\0') return fallback;
  return std::strtoull(text, nullptr, 10);
}

int64_t OpsFromEnvironment(int64_t fallback) {
  const char* text = std::getenv("TIDEPOOL_DIFFERENTIAL_OPS");
  if (text == nullptr || *text == '\0') return fallback;
  return std::strtoll(text, nullptr, 10);
}

// 1 B to 16 MiB, most of them small.
size_t RandomSize(std::mt19937_64& random) {
  const uint64_t band = random() % 100;
  const int bits = band < 70 ? 1 + static_cast<int>(random() % 16)         // up to 64 KiB
                   : band < 95 ? 16 + static_cast<int>(random() % 5)     // up to 2 MiB
                               : 21 + static_cast<int>(random() % 3);    // up to 16 MiB
  const size_t base = size_t{1} << (bits - 1);
  return base + random() % base;
}

const char* CodeName(absl::StatusCode code) {
  switch (code) {
    case absl::StatusCode::kOk: return "OK";
    case absl::StatusCode::kNotFound: return "NOT_FOUND";
    case absl::StatusCode::kFailedPrecondition: return "FAILED_PRECONDITION";
    case absl::StatusCode::kInvalidArgument: return "INVALID_ARGUMENT";
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
constexpr int kMaxRoutes = 12;

struct ModelRoute {
  uint64_t sequence = 0;
  RouteFilter::Kind kind = RouteFilter::Kind::kCurrentThread;
  int stream = 0;  // kStream
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

struct FreedRange {
  uintptr_t end = 0;
  int stream = 0;
  int pool = 0;
  int generation = 0;
  uint64_t stream_position = 0;
  uint8_t uses = 0;
  std::array<uint64_t, kStreams> use_positions{};
};

struct Counters {
  int64_t allocations = 0, frees = 0, routed_allocations = 0, record_streams = 0;
  int64_t begins = 0, created = 0, revived = 0, afresh = 0;
  int64_t ends = 0, end_refusals = 0;
  int64_t releases = 0, release_refusals = 0, gone = 0;
  int64_t empty_caches = 0, trims = 0, snapshots = 0, guarded_reuses = 0, route_checks = 0;
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
        c.allocations, c.routed_allocations, c.frees, c.record_streams, c.guarded_reuses,
        c.begins, c.created, c.revived, c.afresh, c.ends, c.end_refusals, c.releases,
        c.release_refusals, c.gone, c.empty_caches, c.trims, c.snapshots, c.route_checks,
        checks_);
    std::fflush(stdout);
    // The run exercised what it is meant to.
    CHECK(c.routed_allocations > ops_ / 20);
    CHECK(c.allocations - c.routed_allocations > ops_ / 20);
    CHECK(c.revived > 0);
    CHECK(c.afresh > 0);
    CHECK(c.gone > 0);
    CHECK(c.end_refusals > 0);
    CHECK(c.release_refusals > 0);
    CHECK(c.guarded_reuses > 0);
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
  void Note(std::string text) {
    if (history_.size() == 16) history_.pop_front();
    history_.push_back(absl::StrCat(op_, ": ", text));
  }
  std::string Name(int pool) const {
    return pool == kDefault ? "default" : absl::StrCat("pool ", pool, " ", pools_[pool].id.ToString());
  }
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
          if (it->stream == stream) return it->pool;
          break;
        case RouteFilter::Kind::kCapture:
          break;
      }
    }
    return kDefault;
  }

  void Step() {
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

  void DoAllocate() {
    const int s = static_cast<int>(random_() % kStreams);
    const size_t size = RandomSize(random_);
    const int expected = Predict(s);
    absl::StatusOr<PoolId> route = manager_->RouteOf(streams_[s]);
    Check(route.ok() && *route == pools_[expected].id,
          absl::StrCat("RouteOf(stream ", s, ") is ",
                       route.ok() ? route->ToString() : route.status().ToString(),
                       "; the model says ", Name(expected)));
    absl::StatusOr<void*> result = manager_->Allocate(size, streams_[s]);
    Note(absl::StrCat("Allocate(", size, ", stream ", s, ") -> ",
                      result.ok() ? absl::StrCat(reinterpret_cast<uintptr_t>(*result))
                                  : result.status().ToString(),
                      " (model: ", Name(expected), ")"));
    Check(result.ok(), absl::StrCat("an allocation failed: ", result.status().ToString()));
    ++counters_.allocations;
    if (expected != kDefault) ++counters_.routed_allocations;
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
    Check(of.ok() && *of == pools_[expected].id,
          absl::StrCat("the block landed in ", of.ok() ? of->ToString() : of.status().ToString(),
                       "; the model says ", Name(expected)));
    auto next = live_by_address_.lower_bound(block.address);
    if (next != live_by_address_.end()) {
      Check(next->first >= block.address + block.size, "a new block overlaps a live block");
    }
    if (next != live_by_address_.begin()) {
      Check(std::prev(next)->second <= block.address, "a new block overlaps a live block");
    }
    CheckReuseIsSafe(block);
    live_by_address_.emplace(block.address, block.address + block.size);
    live_.push_back(block);
    ModelPool& pool = pools_[expected];
    ++pool.live;
    pool.requested += static_cast<int64_t>(block.requested);
    pool.allocated += static_cast<int64_t>(block.size);
    CheckPoolStats(expected);
  }

  // Stream-ordered reuse, pool by pool: the SAFETY rule of the allocator's own differential test,
  // plus: bytes go back only to the pool (and the arena) they came from.
  void CheckReuseIsSafe(const LiveBlock& block) {
    const uintptr_t begin = block.address;
    const uintptr_t end = block.address + block.size;
    auto it = freed_.lower_bound(begin);
    if (it != freed_.begin() && std::prev(it)->second.end > begin) it = std::prev(it);
    std::vector<std::pair<uintptr_t, FreedRange>> keep;
    while (it != freed_.end() && it->first < end) {
      const FreedRange& freed = it->second;
      Check(freed.pool == block.pool && freed.generation == block.generation,
            absl::StrCat("bytes freed into ", Name(freed.pool), " (generation ", freed.generation,
                         ") were handed out by ", Name(block.pool), " (generation ",
                         block.generation, ")"));
      if (block.stream != freed.stream) {
        Check(device_->IsComplete(streams_[freed.stream], freed.stream_position),
              "bytes freed on one stream were handed to another before its work completed");
      }
      if (freed.uses != 0) ++counters_.guarded_reuses;
      for (int u = 0; u < kStreams; ++u) {
        if ((freed.uses & (1u << u)) == 0) continue;
        Check(device_->IsComplete(streams_[u], freed.use_positions[u]),
              "bytes of a block used on another stream (RecordStream) were handed out again "
              "before that stream's work up to the free completed");
      }
      if (it->first < begin) keep.emplace_back(it->first, FreedRange(freed)).second.end = begin;
      if (freed.end > end) keep.emplace_back(end, freed);
      it = freed_.erase(it);
    }
    for (auto& [start, range] : keep) freed_.emplace(start, range);
  }

  // Forgets the freed bytes of arenas that are gone: they went back to the device, and the
  // simulated device never hands the same addresses out again.
  void PruneFreed() {
    for (auto it = freed_.begin(); it != freed_.end();) {
      const FreedRange& range = it->second;
      if (range.generation != pools_[range.pool].generation || Gone(range.pool)) {
        it = freed_.erase(it);
      } else {
        ++it;
      }
    }
  }

  void DoFree() {
    size_t index = random_() % live_.size();
    // Now and then, drain a released pool, so that pools go away and come back afresh.
    if (random_() % 2 == 0) {
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
    Check(freed.ok(), absl::StrCat("Free of a live block failed: ", freed.ToString()));
    ++counters_.frees;
    live_by_address_.erase(block.address);
    FreedRange range;
    range.end = block.address + block.size;
    range.stream = block.stream;
    range.pool = block.pool;
    range.generation = block.generation;
    range.stream_position = enqueued_[block.stream];
    range.uses = block.uses;
    for (int u = 0; u < kStreams; ++u) range.use_positions[u] = enqueued_[u];
    freed_[block.address] = range;
    ModelPool& pool = pools_[block.pool];
    --pool.live;
    pool.requested -= static_cast<int64_t>(block.requested);
    pool.allocated -= static_cast<int64_t>(block.size);
    if (Gone(block.pool)) {
      ++counters_.gone;
      Note(absl::StrCat(Name(block.pool), " is gone with its last block"));
    }
    CheckPoolStats(block.pool);
  }

  void DoRecordStream() {
    LiveBlock& block = live_[random_() % live_.size()];
    const int u = static_cast<int>(random_() % kStreams);
    enqueued_[u] = device_->Enqueue(streams_[u]);  // the use
    const absl::Status recorded =
        allocator_->RecordStream(reinterpret_cast<void*>(block.address), streams_[u]);
    Note(absl::StrCat("RecordStream(", block.address, ", stream ", u, ") -> ", recorded.ToString()));
    Check(recorded.ok(), "RecordStream on a live block failed");
    ++counters_.record_streams;
    if (u != block.stream) block.uses |= static_cast<uint8_t>(1u << u);
  }

  void DoBegin() {
    if (routes_.size() >= kMaxRoutes) return DoEnd();
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
    Check(status.ok(), absl::StrCat("Begin failed: ", status.ToString()));
    ++counters_.begins;
    if (what == kCreate) {
      pool.known = true;
      ++pool.generation;
      ++counters_.created;
      const AllocatorStats fresh = PoolStats(p);
      Check(fresh.active_blocks.added == 0 && fresh.reserved_bytes.added == 0 &&
                fresh.requested_bytes.peak == 0,
            absl::StrCat(Name(p), " is new but has statistics"));
    } else {
      if (what == kRevive) ++counters_.revived;
      if (what == kAfresh) ++counters_.afresh;  // same arena, same generation
      const AllocatorStats after = PoolStats(p);
      Check(after.active_blocks.added == before.active_blocks.added &&
                after.requested_bytes.peak == before.requested_bytes.peak,
            absl::StrCat(Name(p), " should be the same pool as before Begin, with its statistics"));
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
      p = routes_[random_() % routes_.size()].pool;
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
    Check(status.code() == expected,
          absl::StrCat("End(", Name(p), ") returned ", status.ToString(), "; the model says ",
                       CodeName(expected)));
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
    Check(status.code() == expected,
          absl::StrCat("Release(", Name(p), ") returned ", status.ToString(),
                       "; the model says ", CodeName(expected), " (references ",
                       pool.references, ", routes ", pool.routes, ")"));
    ++counters_.releases;
    if (expected != absl::StatusCode::kOk) {
      ++counters_.release_refusals;
      return;
    }
    --pool.references;
    if (pool.references == 0) {
      if (Gone(p)) ++counters_.gone;
      // Its free memory went back at once.
      if (Gone(p)) CheckHoldsNothing(p, "a pool released with no live block");
    }
  }

  void DoTrim() {
    const int p = static_cast<int>(random_() % (kUnknown + 1));
    const absl::Status status = manager_->Trim(pools_[p].id);
    Note(absl::StrCat("Trim(", Name(p), ") -> ", status.ToString()));
    const absl::StatusCode expected =
        pools_[p].known ? absl::StatusCode::kOk : absl::StatusCode::kNotFound;
    Check(status.code() == expected, absl::StrCat("Trim returned ", status.ToString()));
    ++counters_.trims;
    if (pools_[p].known && pools_[p].live == 0) CheckHoldsNothing(p, "a trimmed pool");
  }

  void DoEmptyCache() {
    const absl::Status status = allocator_->EmptyCache();
    Note(absl::StrCat("EmptyCache() -> ", status.ToString()));
    Check(status.ok(), "EmptyCache failed");
    ++counters_.empty_caches;
    for (int p = 0; p <= kDefault; ++p) {
      if (pools_[p].known && pools_[p].live == 0) CheckHoldsNothing(p, "after EmptyCache, a pool");
    }
  }

  // --- Checks ---------------------------------------------------------------------------------

  AllocatorStats PoolStats(int p) {
    absl::StatusOr<AllocatorStats> stats = manager_->Stats(pools_[p].id);
    Check(stats.ok(), absl::StrCat("Stats(", Name(p), ") failed: ", stats.status().ToString()));
    return *stats;
  }

  void CheckHoldsNothing(int p, const char* what) {
    const AllocatorStats stats = PoolStats(p);
    // Address ranges (segments with nothing mapped) may stay; memory may not.
    Check(stats.reserved_bytes.current == 0,
          absl::StrCat(what, " with no live block still holds memory: ", Name(p), " has ",
                       stats.reserved_bytes.current, " bytes in ", stats.segments.current,
                       " segments"));
  }

  void CheckPoolStats(int p) {
    const ModelPool& pool = pools_[p];
    const AllocatorStats stats = PoolStats(p);
    Check(stats.active_blocks.current == pool.live &&
              stats.requested_bytes.current == pool.requested &&
              stats.allocated_bytes.current == pool.allocated,
          absl::StrCat("Stats(", Name(p), "): ", stats.active_blocks.current, " blocks, ",
                       stats.requested_bytes.current, " requested, ",
                       stats.allocated_bytes.current, " allocated; the model says ", pool.live,
                       ", ", pool.requested, ", ", pool.allocated));
    if (Gone(p)) CheckHoldsNothing(p, "a gone pool");
  }

  void CheckInfo() {
    for (int p = 0; p <= kUnknown; ++p) {
      const ModelPool& pool = pools_[p];
      absl::StatusOr<PoolInfo> info = manager_->Info(pool.id);
      if (!pool.known) {
        Check(absl::IsNotFound(info.status()), absl::StrCat("Info(", Name(p), ") should be NOT_FOUND"));
        continue;
      }
      Check(info.ok(), absl::StrCat("Info(", Name(p), ") failed: ", info.status().ToString()));
      const bool released = p != kDefault && pool.references == 0;
      Check(info->references == pool.references && info->routes == pool.routes &&
                info->live_blocks == pool.live && info->released == released,
            absl::StrCat("Info(", Name(p), "): references ", info->references, ", routes ",
                         info->routes, ", live ", info->live_blocks,
                         info->released ? ", released" : "", "; the model says ",
                         pool.references, ", ", pool.routes, ", ", pool.live,
                         released ? ", released" : ""));
    }
  }

  void CheckRoutes() {
    for (int s = 0; s < kStreams; ++s) {
      const int expected = Predict(s);
      absl::StatusOr<PoolId> route = manager_->RouteOf(streams_[s]);
      ++counters_.route_checks;
      Check(route.ok() && *route == pools_[expected].id,
            absl::StrCat("RouteOf(stream ", s, ") is ",
                         route.ok() ? route->ToString() : route.status().ToString(),
                         "; the model says ", Name(expected)));
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
    Check(listed == expected,
          absl::StrCat("Snapshot(", Name(p), ") lists ", listed.size(),
                       " allocated blocks; the model has ", expected.size(), " live"));
  }

  void Teardown() {
    Note("teardown");
    while (!live_.empty()) DoFree();
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
        Check(status.ok(), absl::StrCat("Release at teardown: ", status.ToString()));
        --pools_[p].references;
      }
    }
    CheckInfo();
    for (int p = 0; p < kPools; ++p) {
      if (pools_[p].known) CheckHoldsNothing(p, "at teardown, a released pool");
    }
    Check(allocator_->EmptyCache().ok(), "EmptyCache at teardown failed");
    Check(device_->used_bytes() == 0,
          absl::StrCat("the device still holds ", device_->used_bytes(), " bytes"));
    Check(device_->live_segments() == 0,
          absl::StrCat("the device still holds ", device_->live_segments(), " segments"));
    Check(allocator_->GetStats().active_blocks.current == 0, "live blocks after teardown");
    Check(device_->capture_violations() == 0, "an event was queried during a capture");
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
    Check(status.ok(), absl::StrCat("End(", Name(p), ") at teardown: ", status.ToString()));
    routes_.erase(found);
    --pools_[p].routes;
  }

  const bool expandable_;
  const uint64_t seed_;
  const int64_t ops_;
  std::mt19937_64 random_;
  std::unique_ptr<SimulatedDevice> device_;
  std::unique_ptr<CachingAllocator> allocator_;
  std::unique_ptr<PoolManager> manager_;
  std::array<Stream, kStreams> streams_{};
  std::array<StreamId, kStreams> stream_ids_{};
  std::array<uint64_t, kStreams> enqueued_{};
  std::array<ModelPool, kUnknown + 1> pools_;
  std::vector<ModelRoute> routes_;  // oldest first
  uint64_t next_sequence_ = 1;
  std::vector<LiveBlock> live_;
  std::map<uintptr_t, uintptr_t> live_by_address_;
  std::map<uintptr_t, FreedRange> freed_;
  int64_t op_ = 0;
  int64_t checks_ = 0;
  Counters counters_;
  std::deque<std::string> history_;
};

TEST_CASE("a million random pool operations agree with the model of routing and references") {
  const bool expandable = GENERATE(true, false);
  const uint64_t seed = SeedFromEnvironment(20240707 + (expandable ? 0 : 1));
  const int64_t ops = OpsFromEnvironment(expandable ? 1000000 : 250000);
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
      const size_t size = RandomSize(random) / 4 + 1;
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
  const uint64_t seed = SeedFromEnvironment(4242 + (expandable ? 0 : 1));
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
