// The symmetric pool (nccl/symmetric_pool.h) with ranks as threads (thread_agreement.h) over the
// fake NCCL (fake_nccl.cc): every rank places every buffer at the same segment and offset under
// a randomized program and different thread schedules; ranks that diverge, skip a growth or stall
// all get a clean error within the timeout, with nothing registered; and the misuses a program
// makes (a foreign or double free, a trim with live buffers, a call after the pool broke) are
// refused without harm. The fake's violation counter stays at zero throughout.
#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "catch2/catch.hpp"
#include "nccl/symmetric_pool.h"
#include "nccl/symmetric_segments.h"
#include "tests/nccl/fake_nccl_controls.h"
#include "tests/nccl/thread_agreement.h"
#include "tests/testing/randomized_run.h"

namespace tidepool {
namespace {

using testing::Fake;
using testing::OnEveryRank;
using testing::ThreadAgreement;
using testing::ThreadGroup;
using testing::TheFake;

constexpr size_t kMiB = size_t{1} << 20;

// One rank: its own communicator (the fake tells them apart by pointer), segments and pool.
struct Rank {
  Rank(Fake& fake, ThreadGroup* group, int rank, int ranks, int communicator,
       SymmetricPool::Options options)
      : agreement(group, rank, ranks),
        segments(fake.nccl.get(), testing::FakeCommunicator(communicator), [] { return 0; }),
        pool(&segments, &agreement, options) {}
  ThreadAgreement agreement;
  SymmetricSegments segments;
  SymmetricPool pool;
};

std::vector<std::unique_ptr<Rank>> MakeRanks(Fake& fake, ThreadGroup* group, int ranks,
                                             int first_communicator,
                                             SymmetricPool::Options options) {
  std::vector<std::unique_ptr<Rank>> made;
  for (int rank = 0; rank < ranks; ++rank) {
    made.push_back(std::make_unique<Rank>(fake, group, rank, ranks, first_communicator + rank,
                                          options));
  }
  return made;
}

TEST_CASE("every rank places every buffer alike, whatever the thread schedules") {
  Fake& fake = TheFake();
  constexpr int kRanks = 4;
  const uint64_t seed = testing::SeedFromEnvironment(20261206);
  const int64_t ops = testing::OpsFromEnvironment(100000);
  INFO("seed " << seed << ", " << ops << " operations per rank (TIDEPOOL_TEST_SEED, _OPS)");
  ThreadGroup group(kRanks);
  SymmetricPool::Options options;
  options.growth_bytes = 4 * kMiB;
  options.agreement_timeout = absl::Seconds(60);
  std::vector<std::unique_ptr<Rank>> ranks = MakeRanks(fake, &group, kRanks, 100, options);
  // Per rank: (segment, offset) of every allocation, in order.
  std::vector<std::vector<std::pair<uint64_t, size_t>>> placed(kRanks);
  std::vector<std::string> errors(kRanks);
  OnEveryRank(kRanks, [&](int r) {
    Rank& rank = *ranks[r];
    std::mt19937_64 program(seed);           // the same program on every rank
    std::mt19937_64 schedule(seed + 7 + r);  // a different schedule on each
    std::vector<void*> live;
    for (int64_t op = 0; op < ops && errors[r].empty(); ++op) {
      if (schedule() % 64 == 0) std::this_thread::yield();
      if (schedule() % 4096 == 0) std::this_thread::sleep_for(std::chrono::microseconds(200));
      const uint64_t dice = program() % 100;
      if (dice < 55 || live.empty()) {
        const size_t bytes = 1 + program() % (dice < 5 ? 3 * kMiB : 256 * 1024);
        absl::StatusOr<void*> block = rank.pool.Allocate(bytes);
        if (!block.ok()) {
          errors[r] = block.status().ToString();
          break;
        }
        absl::StatusOr<SymmetricPool::Location> where = rank.pool.Lookup(*block);
        if (!where.ok()) {
          errors[r] = where.status().ToString();
          break;
        }
        placed[r].emplace_back(where->segment, where->offset);
        live.push_back(*block);
      } else {
        const size_t index = program() % live.size();
        if (absl::Status s = rank.pool.Free(live[index]); !s.ok()) errors[r] = s.ToString();
        live[index] = live.back();
        live.pop_back();
      }
    }
    for (void* block : live) {
      if (absl::Status s = rank.pool.Free(block); !s.ok()) errors[r] = s.ToString();
    }
  });
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank " << r);
    CHECK(errors[r].empty());
    CHECK(placed[r] == placed[0]);
  }
  CHECK(placed[0].size() > static_cast<size_t>(ops / 2));
  const SymmetricPool::Stats stats = ranks[0]->pool.GetStats();
  CHECK(stats.growths > 2);  // the program outgrew its first segments, so growth was agreed
  CHECK(stats.live_blocks == 0);
  CHECK(fake.registrations() == kRanks * stats.segments);
  // A collective trim gives every segment back, on every rank.
  OnEveryRank(kRanks, [&](int r) { errors[r] = ranks[r]->pool.Trim().ToString(); });
  for (int r = 0; r < kRanks; ++r) CHECK(errors[r] == "OK");
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("ranks that reserve different sizes all fail, and nothing is registered") {
  Fake& fake = TheFake();
  constexpr int kRanks = 3;
  ThreadGroup group(kRanks);
  SymmetricPool::Options options;
  options.agreement_timeout = absl::Seconds(10);
  std::vector<std::unique_ptr<Rank>> ranks = MakeRanks(fake, &group, kRanks, 200, options);
  std::vector<absl::Status> results(kRanks);
  OnEveryRank(kRanks,
              [&](int r) { results[r] = ranks[r]->pool.Reserve(r == 1 ? 8 * kMiB : 4 * kMiB); });
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank " << r << ": " << results[r].ToString());
    CHECK(absl::IsFailedPrecondition(results[r]));
    CHECK(results[r].message().find("diverged") != std::string::npos);
  }
  CHECK(fake.registrations() == 0);
  // The pools are broken now, and say so at once.
  absl::StatusOr<void*> after = ranks[0]->pool.Allocate(4096);
  CHECK(absl::IsFailedPrecondition(after.status()));
  CHECK(after.status().message().find("broken") != std::string::npos);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a rank whose allocation fails makes every rank fail alike, and nothing registers") {
  Fake& fake = TheFake();
  constexpr int kRanks = 3;
  ThreadGroup group(kRanks);
  SymmetricPool::Options options;
  options.agreement_timeout = absl::Seconds(10);
  std::vector<std::unique_ptr<Rank>> ranks = MakeRanks(fake, &group, kRanks, 700, options);
  fake.fail_next_alloc();  // whichever rank allocates first finds the device full
  std::vector<absl::Status> results(kRanks);
  OnEveryRank(kRanks, [&](int r) { results[r] = ranks[r]->pool.Reserve(4 * kMiB); });
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank " << r << ": " << results[r].ToString());
    CHECK(absl::IsResourceExhausted(results[r]));
    CHECK(results[r].message().find("no rank registered it") != std::string::npos);
  }
  CHECK(fake.registrations() == 0);
  CHECK(fake.live_allocations() == 0);
  // The pools are intact: the next collective reserve works everywhere.
  OnEveryRank(kRanks, [&](int r) { results[r] = ranks[r]->pool.Reserve(4 * kMiB); });
  for (int r = 0; r < kRanks; ++r) CHECK(results[r].ok());
  CHECK(fake.live_windows() == kRanks);
  OnEveryRank(kRanks, [&](int r) { results[r] = ranks[r]->pool.Trim(); });
  CHECK(fake.live_windows() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a NULL window on one rank only breaks every rank's pool alike, nothing placed there") {
  Fake& fake = TheFake();
  constexpr int kRanks = 3;
  ThreadGroup group(kRanks);
  SymmetricPool::Options options;
  options.agreement_timeout = absl::Seconds(10);
  std::vector<std::unique_ptr<Rank>> ranks = MakeRanks(fake, &group, kRanks, 900, options);
  fake.set_null_window_on(testing::FakeCommunicator(901), 1);  // rank 1's communicator only
  std::vector<absl::Status> results(kRanks);
  OnEveryRank(kRanks, [&](int r) { results[r] = ranks[r]->pool.Reserve(4 * kMiB); });
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank " << r << ": " << results[r].ToString());
    CHECK(absl::IsFailedPrecondition(results[r]));
    CHECK(results[r].message().find("failed on rank(s) 1") != std::string::npos);
    // Every pool is broken, so no rank places a buffer in a segment rank 1 lacks.
    absl::StatusOr<void*> after = ranks[r]->pool.Allocate(4096);
    CHECK(absl::IsFailedPrecondition(after.status()));
  }
  // Rank 1 freed its memory again; the others keep their windows unused rather than wait for
  // rank 1 in a deregistration it would never join.
  CHECK(fake.live_windows_on(testing::FakeCommunicator(901)) == 0);
  CHECK(fake.live_windows_on(testing::FakeCommunicator(900)) == 1);
  CHECK(fake.live_windows_on(testing::FakeCommunicator(902)) == 1);
  CHECK(fake.live_allocations() == 2);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a rank that skips a growth, or stalls, makes every rank fail within the timeout") {
  Fake& fake = TheFake();
  constexpr int kRanks = 3;
  const absl::Duration timeout = absl::Milliseconds(300);
  SymmetricPool::Options options;
  options.agreement_timeout = timeout;
  for (const bool stall : {false, true}) {
    INFO((stall ? "rank 2 stalls past the timeout" : "rank 2 never reserves"));
    ThreadGroup group(kRanks);
    std::vector<std::unique_ptr<Rank>> ranks =
        MakeRanks(fake, &group, kRanks, stall ? 300 : 400, options);
    std::vector<absl::Status> results(kRanks);
    std::vector<double> seconds(kRanks);
    OnEveryRank(kRanks, [&](int r) {
      const auto start = std::chrono::steady_clock::now();
      if (r == 2 && !stall) {
        results[r] = absl::OkStatus();  // skips the collective
        return;
      }
      if (r == 2) std::this_thread::sleep_for(std::chrono::milliseconds(900));
      results[r] = ranks[r]->pool.Reserve(kMiB);
      seconds[r] =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    });
    for (int r = 0; r < 2; ++r) {
      INFO("rank " << r << ": " << results[r].ToString() << " after " << seconds[r] << " s");
      CHECK(absl::IsDeadlineExceeded(results[r]));
      CHECK(seconds[r] < 3.0);
    }
    if (stall) {
      // The late rank finds the communicator aborted and fails at once.
      INFO("rank 2: " << results[2].ToString());
      CHECK(absl::IsFailedPrecondition(results[2]));
      CHECK(seconds[2] < 0.9 + 1.0);
    }
    CHECK(fake.registrations() == 0);
  }
  CHECK(fake.violations() == 0);
}

TEST_CASE("misuse of a symmetric pool is refused and changes nothing") {
  Fake& fake = TheFake();
  ThreadGroup group(1);
  SymmetricPool::Options options;
  options.growth_bytes = 0;  // Reserve only
  std::vector<std::unique_ptr<Rank>> ranks = MakeRanks(fake, &group, 1, 500, options);
  SymmetricPool& pool = ranks[0]->pool;
  CHECK(absl::IsResourceExhausted(pool.Allocate(4096).status()));  // nothing reserved
  REQUIRE(pool.Reserve(kMiB).ok());
  REQUIRE(pool.Reserve(kMiB).ok());
  absl::StatusOr<void*> block = pool.Allocate(100);
  REQUIRE(block.ok());
  int foreign = 0;
  CHECK(absl::IsInvalidArgument(pool.Free(&foreign)));
  CHECK(absl::IsFailedPrecondition(pool.Free(static_cast<char*>(*block) + 8)));
  absl::StatusOr<SymmetricPool::Location> inside = pool.Lookup(static_cast<char*>(*block) + 8);
  REQUIRE(inside.ok());
  CHECK(inside->segment == 0);
  CHECK(inside->offset == 8);
  CHECK(inside->window != nullptr);
  // A trim with a live buffer gives back only the empty segment.
  REQUIRE(pool.Trim().ok());
  CHECK(pool.GetStats().segments == 1);
  CHECK(fake.live_windows() == 1);
  REQUIRE(pool.Free(*block).ok());
  CHECK(absl::IsFailedPrecondition(pool.Free(*block)));  // a double free
  REQUIRE(pool.Trim().ok());
  CHECK(pool.GetStats().segments == 0);
  CHECK(pool.SnapshotJson() == "{\"segments\":[]}");
  CHECK(fake.live_windows() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a pool grows or trims only outside captures, and refuses before asking the others") {
  Fake& fake = TheFake();
  ThreadGroup group(1);
  std::atomic<int> captures{0};
  ThreadAgreement agreement(&group, 0, 1);
  SymmetricSegments segments(fake.nccl.get(), testing::FakeCommunicator(600),
                             [&] { return captures.load(); });
  SymmetricPool::Options options;
  options.growth_bytes = kMiB;
  SymmetricPool pool(&segments, &agreement, options);
  absl::StatusOr<void*> before = pool.Allocate(512 * 1024);  // grows, outside any capture
  REQUIRE(before.ok());
  captures = 1;
  // Room left in the segment: served during the capture, no growth needed.
  absl::StatusOr<void*> inside = pool.Allocate(256 * 1024);
  CHECK(inside.ok());
  // No room: refused before any agreement (so no rank waits for this one), pool intact.
  absl::StatusOr<void*> too_big = pool.Allocate(2 * kMiB);
  CHECK(absl::IsFailedPrecondition(too_big.status()));
  CHECK(too_big.status().message().find("capture") != std::string::npos);
  CHECK(absl::IsFailedPrecondition(pool.Trim()));
  CHECK(absl::IsFailedPrecondition(pool.Reserve(kMiB)));
  captures = 0;
  absl::StatusOr<void*> after = pool.Allocate(2 * kMiB);  // the pool is not broken
  CHECK(after.ok());
  CHECK(pool.GetStats().segments == 2);
  for (absl::StatusOr<void*>* block : {&before, &inside, &after}) {
    if (block->ok()) REQUIRE(pool.Free(**block).ok());
  }
  REQUIRE(pool.Trim().ok());
  CHECK(fake.live_windows() == 0);
  CHECK(fake.violations() == 0);
}

}  // namespace
}  // namespace tidepool
