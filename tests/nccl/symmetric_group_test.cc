// One process driving several GPUs from one thread (nccl/symmetric_group.h), over the fake NCCL
// (fake_nccl.cc) with its communicators declared one clique, so that registration and
// deregistration are collective as in NCCL: a call made rank by rank from one thread would wait
// for the other local ranks for ever, and the fake counts it as a hang. Every case requires no
// hang and no violation, and shows what it relies on: a group Reserve registers exactly one
// window per segment and communicator; the same work done rank by rank hangs; local ranks place
// alike under a randomized program; growth from Allocate is refused in words; Trim deregisters
// before it frees; two "processes" (threads of two local ranks each) agree across threads, and
// fail cleanly within the timeout when they diverge or one stalls; a failed allocation on one
// rank fails every rank alike and leaves the group usable; a NULL window or failed registration
// on one local rank leaves nothing registered.
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "catch2/catch.hpp"
#include "nccl/symmetric_group.h"
#include "nccl/symmetric_pool.h"
#include "nccl/symmetric_segments.h"
#include "tests/nccl/fake_nccl_controls.h"
#include "tests/nccl/thread_agreement.h"
#include "tests/testing/randomized_run.h"

namespace tidepool {
namespace {

using testing::Fake;
using testing::FakeCommunicator;
using testing::ThreadAgreement;
using testing::ThreadGroup;
using testing::TheFake;

constexpr size_t kMiB = size_t{1} << 20;

// One local rank: its agreement and its communicator's segments.
struct Local {
  Local(Fake& fake, ThreadGroup* group, int rank, int ranks, int communicator)
      : agreement(group, rank, ranks),
        segments(fake.nccl.get(), FakeCommunicator(communicator), [] { return 0; }) {}
  ThreadAgreement agreement;
  SymmetricSegments segments;
};

// One process: local ranks [first, first + count) of a clique of `ranks` ranks, rank r on
// communicator `first_communicator + r`, and their group (destroyed before the locals).
struct Process {
  std::vector<std::unique_ptr<Local>> locals;
  std::unique_ptr<SymmetricPoolGroup> group;
};

// Declares communicators first_communicator .. + ranks - 1 one clique of the fake NCCL.
void DeclareClique(Fake& fake, int clique, int ranks, int first_communicator) {
  for (int r = 0; r < ranks; ++r) {
    fake.set_clique(FakeCommunicator(first_communicator + r), clique, r, ranks);
  }
}

Process MakeProcess(Fake& fake, ThreadGroup* group, int first, int count, int ranks,
                    int first_communicator, SymmetricPool::Options options) {
  Process process;
  std::vector<SymmetricPoolGroup::LocalRank> locals;
  for (int r = first; r < first + count; ++r) {
    process.locals.push_back(
        std::make_unique<Local>(fake, group, r, ranks, first_communicator + r));
    locals.push_back({&process.locals.back()->segments, &process.locals.back()->agreement});
  }
  absl::StatusOr<std::unique_ptr<SymmetricPoolGroup>> made =
      SymmetricPoolGroup::Create(std::move(locals), options);
  INFO(made.status().ToString());
  REQUIRE(made.ok());
  process.group = *std::move(made);
  return process;
}

SymmetricPool::Options Timeout(absl::Duration timeout) {
  SymmetricPool::Options options;
  options.agreement_timeout = timeout;
  return options;
}

double SecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

bool Contains(const absl::Status& status, const std::string& words) {
  return status.message().find(words) != std::string::npos;
}

TEST_CASE("one thread registers its local ranks in one group: one window per segment each") {
  Fake& fake = TheFake();
  constexpr int kRanks = 4;
  DeclareClique(fake, 1, kRanks, 100);
  ThreadGroup group(kRanks);
  {
    Process process = MakeProcess(fake, &group, 0, kRanks, kRanks, 100, Timeout(absl::Seconds(10)));
    SymmetricPoolGroup& pools = *process.group;
    REQUIRE(pools.Reserve(4 * kMiB).ok());
    REQUIRE(pools.Reserve(2 * kMiB).ok());
    CHECK(fake.registrations() == 2 * kRanks);
    CHECK(fake.grouped_registrations() == 2 * kRanks);  // every one made at a group's end
    for (int r = 0; r < kRanks; ++r) {
      INFO("rank " << r);
      CHECK(fake.live_windows_on(FakeCommunicator(100 + r)) == 2);
      CHECK(pools.pool(r).GetStats().segments == 2);
      CHECK(pools.pool(r).GetStats().reserved_bytes == static_cast<int64_t>(6 * kMiB));
    }
    // A block on every device: the same segment and offset, each in its own rank's window.
    std::vector<void*> blocks;
    std::vector<SymmetricPool::Location> where;
    for (int r = 0; r < kRanks; ++r) {
      absl::StatusOr<void*> block = pools.pool(r).Allocate(3 * kMiB);  // fits segment 0 only
      REQUIRE(block.ok());
      blocks.push_back(*block);
      absl::StatusOr<SymmetricPool::Location> location = pools.pool(r).Lookup(*block);
      REQUIRE(location.ok());
      where.push_back(*location);
    }
    for (int r = 1; r < kRanks; ++r) {
      CHECK(where[r].segment == where[0].segment);
      CHECK(where[r].offset == where[0].offset);
      CHECK(where[r].window != where[0].window);
    }
    for (int r = 0; r < kRanks; ++r) REQUIRE(pools.pool(r).Free(blocks[r]).ok());
  }
  // The group gave every segment back, deregistered in one group before being freed.
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
  CHECK(fake.group_depth() == 0);
}

TEST_CASE("the same work rank by rank, without a group, would hang") {
  Fake& fake = TheFake();
  constexpr int kRanks = 4;
  fake.set_collective_timeout_ms(100);
  SECTION("registration rank by rank") {
    DeclareClique(fake, 2, kRanks, 200);
    std::vector<std::unique_ptr<SymmetricSegments>> segments;
    for (int r = 0; r < kRanks; ++r) {
      segments.push_back(std::make_unique<SymmetricSegments>(
          fake.nccl.get(), FakeCommunicator(200 + r), [] { return 0; }));
    }
    int failed = 0;
    for (int r = 0; r < kRanks; ++r) {
      absl::StatusOr<void*> memory = segments[r]->AllocateMemory(kMiB);
      REQUIRE(memory.ok());
      if (!segments[r]->Register(*memory, kMiB).ok()) ++failed;
    }
    // Rank 0 waited for ranks the thread had not reached: NCCL would never return.
    CHECK(failed > 0);
    CHECK(fake.hangs() > 0);
    CHECK(fake.live_windows() == 0);
  }
  SECTION("the same registration in one group") {
    DeclareClique(fake, 3, kRanks, 300);
    std::vector<std::unique_ptr<SymmetricSegments>> segments;
    std::vector<SymmetricSegments*> ranks;
    std::vector<void*> memory;
    for (int r = 0; r < kRanks; ++r) {
      segments.push_back(std::make_unique<SymmetricSegments>(
          fake.nccl.get(), FakeCommunicator(300 + r), [] { return 0; }));
      ranks.push_back(segments.back().get());
      absl::StatusOr<void*> m = segments.back()->AllocateMemory(kMiB);
      REQUIRE(m.ok());
      memory.push_back(*m);
    }
    absl::StatusOr<std::vector<SymmetricSegment>> made =
        SymmetricSegments::RegisterTogether(ranks, memory, kMiB);
    INFO(made.status().ToString());
    REQUIRE(made.ok());
    CHECK(fake.live_windows() == kRanks);
    std::vector<std::pair<SymmetricSegments*, SymmetricSegment>> going;
    for (int r = 0; r < kRanks; ++r) going.emplace_back(ranks[r], (*made)[r]);
    REQUIRE(SymmetricSegments::DestroyTogether(going).ok());
    CHECK(fake.hangs() == 0);
    CHECK(fake.violations() == 0);
  }
  SECTION("pools rank by rank: the first agreement waits for ranks the thread never reaches") {
    ThreadGroup group(kRanks);
    std::vector<std::unique_ptr<Local>> locals;
    for (int r = 0; r < kRanks; ++r) {
      locals.push_back(std::make_unique<Local>(fake, &group, r, kRanks, 400 + r));
    }
    SymmetricPool pool(&locals[0]->segments, &locals[0]->agreement,
                       Timeout(absl::Milliseconds(200)));
    CHECK(absl::IsDeadlineExceeded(pool.Reserve(kMiB)));
    CHECK(fake.registrations() == 0);
  }
  CHECK(fake.live_allocations() == 0);
}

TEST_CASE("local ranks place every buffer alike under a randomized program") {
  Fake& fake = TheFake();
  constexpr int kRanks = 4;
  const uint64_t seed = testing::SeedFromEnvironment(20261207);
  const int64_t ops = std::max<int64_t>(10000, testing::OpsFromEnvironment(20000));
  INFO("seed " << seed << ", " << ops << " operations (TIDEPOOL_TEST_SEED, _OPS)");
  DeclareClique(fake, 4, kRanks, 500);
  ThreadGroup group(kRanks);
  Process process = MakeProcess(fake, &group, 0, kRanks, kRanks, 500, Timeout(absl::Seconds(10)));
  SymmetricPoolGroup& pools = *process.group;
  std::mt19937_64 program(seed);       // what every rank does
  std::mt19937_64 schedule(seed + 1);  // the order in which the thread visits the ranks
  std::vector<int> order(kRanks);
  for (int r = 0; r < kRanks; ++r) order[r] = r;
  std::vector<std::vector<std::pair<uint64_t, size_t>>> placed(kRanks);
  std::vector<std::vector<void*>> live(kRanks);
  int64_t reserves = 0;
  int64_t trims = 0;
  std::string error;
  for (int64_t op = 0; op < ops && error.empty(); ++op) {
    std::shuffle(order.begin(), order.end(), schedule);
    const uint64_t dice = program() % 1000;
    if (dice < 5) {
      if (absl::Status s = pools.Trim(); !s.ok()) error = s.ToString();
      ++trims;
    } else if (dice < 560 || live[0].empty()) {
      const size_t bytes = 1 + program() % (dice < 60 ? 3 * kMiB : 256 * 1024);
      std::vector<absl::StatusOr<void*>> blocks(kRanks);
      for (int r : order) blocks[r] = pools.pool(r).Allocate(bytes);
      const bool none = std::all_of(blocks.begin(), blocks.end(), [](const auto& b) {
        return absl::IsResourceExhausted(b.status());
      });
      if (none) {
        // No room on any rank: the program grows every rank at once, then allocates again.
        if (absl::Status s = pools.Reserve(std::max(4 * kMiB, bytes)); !s.ok()) {
          error = s.ToString();
          break;
        }
        ++reserves;
        for (int r : order) blocks[r] = pools.pool(r).Allocate(bytes);
      }
      for (int r = 0; r < kRanks && error.empty(); ++r) {
        if (!blocks[r].ok()) {
          error = absl::StrCat("rank ", r, ": ", blocks[r].status().ToString());
          break;
        }
        absl::StatusOr<SymmetricPool::Location> where = pools.pool(r).Lookup(*blocks[r]);
        if (!where.ok()) {
          error = where.status().ToString();
          break;
        }
        placed[r].emplace_back(where->segment, where->offset);
        live[r].push_back(*blocks[r]);
      }
    } else {
      const size_t index = program() % live[0].size();
      for (int r : order) {
        if (absl::Status s = pools.pool(r).Free(live[r][index]); !s.ok()) error = s.ToString();
        live[r][index] = live[r].back();
        live[r].pop_back();
      }
    }
  }
  INFO(error);
  REQUIRE(error.empty());
  for (int r = 1; r < kRanks; ++r) {
    INFO("rank " << r);
    CHECK(placed[r] == placed[0]);
  }
  CHECK(placed[0].size() > static_cast<size_t>(ops / 2));
  CHECK(reserves > 2);  // the program outgrew its segments, so the group grew it
  CHECK(trims > 10);
  CHECK(fake.registrations() == kRanks * reserves);
  CHECK(fake.grouped_registrations() == kRanks * reserves);
  for (int r = 0; r < kRanks; ++r) {
    for (void* block : live[r]) REQUIRE(pools.pool(r).Free(block).ok());
  }
  REQUIRE(pools.Trim().ok());
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
  CHECK(fake.group_depth() == 0);
}

TEST_CASE("a pool of a group never grows from Allocate, and says to Reserve through the group") {
  Fake& fake = TheFake();
  constexpr int kRanks = 2;
  DeclareClique(fake, 5, kRanks, 600);
  ThreadGroup group(kRanks);
  // A short timeout: a pool that tried to grow anyway would fail with DEADLINE_EXCEEDED.
  SymmetricPool::Options options = Timeout(absl::Milliseconds(200));
  options.growth_bytes = 4 * kMiB;  // ignored in a group
  Process process = MakeProcess(fake, &group, 0, kRanks, kRanks, 600, options);
  SymmetricPoolGroup& pools = *process.group;
  absl::StatusOr<void*> refused = pools.pool(0).Allocate(4096);
  INFO(refused.status().ToString());
  CHECK(absl::IsResourceExhausted(refused.status()));
  CHECK(Contains(refused.status(), "cannot grow on its own"));
  CHECK(Contains(refused.status(), "SymmetricPoolGroup::Reserve"));
  // The pools' own collective steps are refused too, before any rank is asked.
  absl::Status own_reserve = pools.pool(1).Reserve(kMiB);
  CHECK(absl::IsFailedPrecondition(own_reserve));
  CHECK(Contains(own_reserve, "group's Reserve"));
  CHECK(absl::IsFailedPrecondition(pools.pool(1).Trim()));
  CHECK(!group.aborted());
  // Nothing moved out of step: the group's Reserve works, and then so does Allocate.
  REQUIRE(pools.Reserve(kMiB).ok());
  for (int r = 0; r < kRanks; ++r) {
    absl::StatusOr<void*> block = pools.pool(r).Allocate(4096);
    REQUIRE(block.ok());
    absl::StatusOr<void*> too_big = pools.pool(r).Allocate(2 * kMiB);
    CHECK(absl::IsResourceExhausted(too_big.status()));
    REQUIRE(pools.pool(r).Free(*block).ok());
    CHECK(pools.pool(r).GetStats().segments == 1);
  }
  CHECK(fake.registrations() == kRanks);
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a group's Trim keeps segments with live blocks and deregisters before it frees") {
  Fake& fake = TheFake();
  constexpr int kRanks = 3;
  DeclareClique(fake, 6, kRanks, 700);
  ThreadGroup group(kRanks);
  Process process = MakeProcess(fake, &group, 0, kRanks, kRanks, 700, Timeout(absl::Seconds(10)));
  SymmetricPoolGroup& pools = *process.group;
  REQUIRE(pools.Reserve(kMiB).ok());
  REQUIRE(pools.Reserve(kMiB).ok());
  std::vector<void*> blocks;
  for (int r = 0; r < kRanks; ++r) {
    absl::StatusOr<void*> block = pools.pool(r).Allocate(1000);
    REQUIRE(block.ok());
    blocks.push_back(*block);
  }
  REQUIRE(pools.Trim().ok());
  for (int r = 0; r < kRanks; ++r) {
    CHECK(pools.pool(r).GetStats().segments == 1);
    CHECK(fake.live_windows_on(FakeCommunicator(700 + r)) == 1);
    REQUIRE(pools.pool(r).Free(blocks[r]).ok());
  }
  CHECK(fake.live_allocations() == kRanks);
  REQUIRE(pools.Trim().ok());
  // The fake counts a violation for any ncclMemFree under a live window.
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(pools.pool(0).SnapshotJson() == "{\"segments\":[]}");
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
}

// Two processes of a 4-rank clique, each a thread driving 2 local ranks: ranks 0-1 and 2-3.
struct TwoProcesses {
  TwoProcesses(Fake& fake, int clique, int first_communicator, SymmetricPool::Options options)
      : group(4) {
    DeclareClique(fake, clique, 4, first_communicator);
    processes.push_back(MakeProcess(fake, &group, 0, 2, 4, first_communicator, options));
    processes.push_back(MakeProcess(fake, &group, 2, 2, 4, first_communicator, options));
  }
  // Runs `body(process)` on a thread of each process and waits for both.
  template <typename Body>
  void OnEach(Body body) {
    std::thread other([&] { body(1); });
    body(0);
    other.join();
  }
  ThreadGroup group;
  std::vector<Process> processes;
};

TEST_CASE("two processes of two GPUs each agree across threads and place alike") {
  Fake& fake = TheFake();
  TwoProcesses two(fake, 7, 800, Timeout(absl::Seconds(10)));
  std::vector<absl::Status> results(2);
  two.OnEach([&](int p) { results[p] = two.processes[p].group->Reserve(2 * kMiB); });
  for (int p = 0; p < 2; ++p) CHECK(results[p].ok());
  CHECK(fake.registrations() == 4);
  std::vector<std::pair<uint64_t, size_t>> where;
  std::vector<std::pair<SymmetricPool*, void*>> blocks;
  for (Process& process : two.processes) {
    for (int i = 0; i < 2; ++i) {
      SymmetricPool& pool = process.group->pool(i);
      REQUIRE(pool.Allocate(3000).ok());
      absl::StatusOr<void*> block = pool.Allocate(70000);
      REQUIRE(block.ok());
      absl::StatusOr<SymmetricPool::Location> location = pool.Lookup(*block);
      REQUIRE(location.ok());
      where.emplace_back(location->segment, location->offset);
    }
  }
  for (const auto& place : where) CHECK(place == where[0]);
  CHECK(where[0].second == 3072);
  // Destroying both groups at once gives every segment back collectively, across the threads.
  two.OnEach([&](int p) { two.processes[p].group.reset(); });
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("two processes that reserve different sizes both fail, and nothing registers") {
  Fake& fake = TheFake();
  TwoProcesses two(fake, 8, 900, Timeout(absl::Seconds(10)));
  std::vector<absl::Status> results(2);
  std::vector<double> seconds(2);
  two.OnEach([&](int p) {
    const auto start = std::chrono::steady_clock::now();
    results[p] = two.processes[p].group->Reserve(p == 0 ? 4 * kMiB : 8 * kMiB);
    seconds[p] = SecondsSince(start);
  });
  for (int p = 0; p < 2; ++p) {
    INFO("process " << p << ": " << results[p].ToString());
    CHECK(absl::IsFailedPrecondition(results[p]));
    CHECK(Contains(results[p], "diverged"));
    CHECK(seconds[p] < 3.0);
    // Every local pool is broken now, and says so at once.
    for (int i = 0; i < 2; ++i) {
      absl::StatusOr<void*> after = two.processes[p].group->pool(i).Allocate(4096);
      CHECK(absl::IsFailedPrecondition(after.status()));
      CHECK(Contains(after.status(), "broken"));
    }
    CHECK(absl::IsFailedPrecondition(two.processes[p].group->Reserve(kMiB)));
  }
  CHECK(fake.registrations() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a process that stalls or never comes makes the other fail within the timeout") {
  Fake& fake = TheFake();
  const absl::Duration timeout = absl::Milliseconds(300);
  for (const bool stall : {false, true}) {
    INFO((stall ? "process 1 stalls past the timeout" : "process 1 never reserves"));
    TwoProcesses two(fake, stall ? 9 : 10, stall ? 1000 : 1100, Timeout(timeout));
    std::vector<absl::Status> results(2);
    std::vector<double> seconds(2);
    two.OnEach([&](int p) {
      const auto start = std::chrono::steady_clock::now();
      if (p == 1 && !stall) return;  // skips the collective
      if (p == 1) std::this_thread::sleep_for(std::chrono::milliseconds(900));
      results[p] = two.processes[p].group->Reserve(kMiB);
      seconds[p] = SecondsSince(start);
    });
    INFO("process 0: " << results[0].ToString() << " after " << seconds[0] << " s");
    CHECK(absl::IsDeadlineExceeded(results[0]));
    CHECK(seconds[0] < 3.0);
    if (stall) {
      // The late process finds the communicators aborted and fails at once.
      INFO("process 1: " << results[1].ToString() << " after " << seconds[1] << " s");
      CHECK(absl::IsFailedPrecondition(results[1]));
      CHECK(seconds[1] < 0.9 + 1.0);
    }
    CHECK(fake.registrations() == 0);
    CHECK(fake.live_allocations() == 0);
  }
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a failed ncclMemAlloc on one rank fails every rank alike; the group stays usable") {
  Fake& fake = TheFake();
  TwoProcesses two(fake, 11, 1200, Timeout(absl::Seconds(10)));
  fake.fail_next_alloc();  // whichever local rank allocates first finds its device full
  std::vector<absl::Status> results(2);
  two.OnEach([&](int p) { results[p] = two.processes[p].group->Reserve(4 * kMiB); });
  for (int p = 0; p < 2; ++p) {
    INFO("process " << p << ": " << results[p].ToString());
    CHECK(absl::IsResourceExhausted(results[p]));
    CHECK(Contains(results[p], "no rank registered it"));
  }
  CHECK(fake.registrations() == 0);
  CHECK(fake.live_allocations() == 0);
  // Intact: the next Reserve works everywhere.
  two.OnEach([&](int p) { results[p] = two.processes[p].group->Reserve(4 * kMiB); });
  for (int p = 0; p < 2; ++p) CHECK(results[p].ok());
  CHECK(fake.live_windows() == 4);
  two.OnEach([&](int p) { results[p] = two.processes[p].group->Trim(); });
  for (int p = 0; p < 2; ++p) CHECK(results[p].ok());
  CHECK(fake.live_windows() == 0);
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a NULL window or a failed registration on one local rank leaves nothing behind") {
  Fake& fake = TheFake();
  constexpr int kRanks = 4;
  const bool null_window = GENERATE(true, false);
  INFO((null_window ? "a NULL window on rank 2" : "a failed registration on rank 0"));
  const int first_communicator = null_window ? 1300 : 1400;
  DeclareClique(fake, null_window ? 12 : 13, kRanks, first_communicator);
  ThreadGroup group(kRanks);
  Process process = MakeProcess(fake, &group, 0, kRanks, kRanks, first_communicator,
                                Timeout(absl::Seconds(10)));
  if (null_window) {
    fake.set_null_window_on(FakeCommunicator(first_communicator + 2), 1);
  } else {
    fake.fail_next_register();  // the first rank the fake registers: rank 0
  }
  absl::Status reserved = process.group->Reserve(kMiB);
  INFO(reserved.ToString());
  if (null_window) {
    CHECK(absl::IsFailedPrecondition(reserved));
    CHECK(Contains(reserved, "NULL window on local rank(s) 2"));
  } else {
    // Every rank, here and elsewhere, learns of it in the registration reports, and fails alike.
    CHECK(absl::IsFailedPrecondition(reserved));
    CHECK(Contains(reserved, "failed on rank(s) 0, 1, 2, 3"));
    CHECK(Contains(reserved, "ncclGroupEnd"));
  }
  // The other ranks' windows were made, then deregistered again; every rank's memory is back.
  CHECK(fake.registrations() == kRanks - (null_window ? 0 : 1));
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  for (int r = 0; r < kRanks; ++r) CHECK(process.group->pool(r).GetStats().segments == 0);
  // Broken, as a pool whose agreed segment failed: every later step fails at once.
  absl::Status after = process.group->Reserve(kMiB);
  CHECK(absl::IsFailedPrecondition(after));
  CHECK(Contains(after, "broken"));
  CHECK(fake.hangs() == 0);
  CHECK(fake.violations() == 0);
  CHECK(fake.group_depth() == 0);
}

TEST_CASE("a group refuses ranks out of order or sharing a communicator") {
  Fake& fake = TheFake();
  ThreadGroup group(2);
  Local zero(fake, &group, 0, 2, 1500);
  Local one(fake, &group, 1, 2, 1501);
  Local one_again(fake, &group, 1, 2, 1500);
  CHECK(absl::IsInvalidArgument(
      SymmetricPoolGroup::Create({{&one.segments, &one.agreement},
                                  {&zero.segments, &zero.agreement}},
                                 SymmetricPool::Options())
          .status()));
  CHECK(absl::IsInvalidArgument(
      SymmetricPoolGroup::Create({{&zero.segments, &zero.agreement},
                                  {&one_again.segments, &one_again.agreement}},
                                 SymmetricPool::Options())
          .status()));
  CHECK(absl::IsInvalidArgument(
      SymmetricPoolGroup::Create({}, SymmetricPool::Options()).status()));
}

}  // namespace
}  // namespace tidepool
