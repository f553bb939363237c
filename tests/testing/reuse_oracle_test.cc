// Tests of the reuse-safety oracle itself: the differential tests trust it to fail exactly when
// reuse or a give-back breaks the stream-ordering rule, so each clause of the rule
// (reuse_oracle.h) has a case here that it must catch, next to the nearest case it must let pass.
#include "tests/testing/reuse_oracle.h"

#include <catch2/catch.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_join.h"
#include "allocator/simulated_device.h"

namespace tidepool {
namespace testing {
namespace {

constexpr uintptr_t kBase = 0x10000;

// A simulated device with two streams, the oracle over them, and the test's own record of what
// it enqueued on each (as a differential test keeps it).
struct OracleFixture {
  OracleFixture() : oracle(&device, streams) {}

  static std::array<Stream, 2> MakeStreams(SimulatedDevice& on) {
    std::array<Stream, 2> made{};
    for (Stream& stream : made) {
      absl::StatusOr<Stream> created = on.CreateStream();
      REQUIRE(created.ok());
      stream = *created;
    }
    return made;
  }
  void Enqueue(int s) { enqueued[s] = device.Enqueue(streams[s]); }
  void CompleteAll(int s) { device.Complete(streams[s]); }

  // Hands out [begin, end) on `s` and REQUIREs the oracle found nothing wrong.
  void AdmitSafely(uintptr_t begin, uintptr_t end, int s, ArenaTag arena = {}) {
    const std::vector<std::string> problems = oracle.Admit(begin, end, s, arena);
    INFO(absl::StrJoin(problems, "\n"));
    REQUIRE(problems.empty());
  }
  void Retire(uintptr_t begin, uint32_t uses = 0, bool deferred = false) {
    REQUIRE(oracle.Retire(begin, uses, enqueued, deferred).empty());
  }

  SimulatedDevice device;
  std::array<Stream, 2> streams = MakeStreams(device);
  std::array<uint64_t, 2> enqueued{};
  ReuseOracle oracle;
};

TEST_CASE("bytes freed on a stream go out again at once on it, elsewhere once its work is done") {
  OracleFixture f;
  f.AdmitSafely(kBase, kBase + 1024, 0);
  f.Enqueue(0);  // work that uses the block, queued before the free
  f.Retire(kBase);

  SECTION("the same stream: safe at once") { f.AdmitSafely(kBase, kBase + 1024, 0); }
  SECTION("another stream, work pending: unsafe") {
    CHECK(f.oracle.Admit(kBase + 512, kBase + 1024, 1).size() == 1);
  }
  SECTION("another stream, work done: safe") {
    f.CompleteAll(0);
    f.AdmitSafely(kBase, kBase + 1024, 1);
  }
}

TEST_CASE("bytes used on another stream (RecordStream) wait for that stream, even on their own") {
  OracleFixture f;
  f.AdmitSafely(kBase, kBase + 1024, 0);
  f.Enqueue(1);
  f.Retire(kBase, /*uses=*/1u << 1);
  CHECK(f.oracle.Admit(kBase, kBase + 1024, 0).size() == 1);
  CHECK(f.oracle.guarded_reuses() == 1);

  OracleFixture g;
  g.AdmitSafely(kBase, kBase + 1024, 0);
  g.Enqueue(1);
  g.Retire(kBase, 1u << 1);
  g.CompleteAll(1);
  g.AdmitSafely(kBase, kBase + 1024, 0);
}

TEST_CASE("a live block is never handed out twice, and the overlapping one is not recorded") {
  OracleFixture f;
  f.AdmitSafely(kBase, kBase + 1024, 0);
  CHECK(f.oracle.Admit(kBase + 512, kBase + 2048, 0).size() == 1);
  CHECK(f.oracle.Admit(kBase - 512, kBase + 1, 1).size() == 1);
  CHECK(f.oracle.live_blocks() == 1);
  f.AdmitSafely(kBase + 1024, kBase + 2048, 1);  // the neighbour is fine
  CHECK(f.oracle.Retire(kBase + 512, 0, f.enqueued) != "");  // not the start of a live block
}

TEST_CASE("bytes go out again only from the arena they were freed into") {
  OracleFixture f;
  f.AdmitSafely(kBase, kBase + 1024, 0, ArenaTag{1, 1});
  f.Retire(kBase);
  CHECK(f.oracle.Admit(kBase, kBase + 1024, 0, ArenaTag{2, 1}).size() == 1);

  OracleFixture g;
  g.AdmitSafely(kBase, kBase + 1024, 0, ArenaTag{1, 1});
  g.Retire(kBase);
  CHECK(g.oracle.Admit(kBase, kBase + 1024, 0, ArenaTag{1, 2}).size() == 1);  // a new arena
}

TEST_CASE("a deferred free waits for the end of the captures, then for the work queued up to it") {
  OracleFixture f;
  f.AdmitSafely(kBase, kBase + 1024, 0);
  f.Enqueue(1);
  f.Retire(kBase, 1u << 1, /*deferred=*/true);
  f.CompleteAll(1);

  SECTION("before the epoch ends: unsafe, all work done or not") {
    CHECK(f.oracle.CheckGiveBack(kBase, kBase + 1024) != "");
    CHECK(f.oracle.Admit(kBase, kBase + 1024, 0).size() == 1);
  }
  SECTION("after: the uses count up to the end of the epoch, not to the free") {
    f.Enqueue(1);
    f.oracle.EndCaptureEpoch(f.enqueued);
    CHECK(f.oracle.Admit(kBase, kBase + 1024, 0).size() == 1);
  }
  SECTION("after, with that work done: safe") {
    f.Enqueue(1);
    f.oracle.EndCaptureEpoch(f.enqueued);
    f.CompleteAll(1);
    f.AdmitSafely(kBase, kBase + 1024, 0);
    CHECK(f.oracle.deferred_reuses() == 1);
  }
}

TEST_CASE("a reuse that covers part of a freed range leaves the rest guarded") {
  OracleFixture f;
  f.AdmitSafely(kBase, kBase + 4096, 0);
  f.Enqueue(0);
  f.Retire(kBase);
  f.AdmitSafely(kBase + 1024, kBase + 2048, 0);
  CHECK(f.oracle.Admit(kBase, kBase + 512, 1).size() == 1);
  CHECK(f.oracle.Admit(kBase + 3072, kBase + 4096, 1).size() == 1);
}

TEST_CASE("memory goes back only with no live block in it and its freed work done") {
  OracleFixture f;
  f.AdmitSafely(kBase, kBase + 1024, 0);
  CHECK(f.oracle.CheckGiveBack(kBase + 512, kBase + 4096) != "");
  f.Enqueue(0);
  f.Retire(kBase);
  CHECK(f.oracle.CheckGiveBack(kBase, kBase + 4096) != "");
  CHECK(f.oracle.CheckGiveBack(kBase + 1024, kBase + 4096) == "");  // beside it
  f.CompleteAll(0);
  CHECK(f.oracle.CheckGiveBack(kBase, kBase + 4096) == "");
}

TEST_CASE("forgetting drops only what no longer matters") {
  OracleFixture f;
  f.AdmitSafely(kBase, kBase + 1024, 0, ArenaTag{1, 1});
  f.AdmitSafely(kBase + 1024, kBase + 2048, 1, ArenaTag{2, 1});
  f.Enqueue(0);
  f.Enqueue(1);
  f.Retire(kBase);
  f.Retire(kBase + 1024);
  f.CompleteAll(1);
  f.oracle.ForgetSettled();
  // Stream 0's work is pending, so its freed range stays; stream 1's was settled and forgotten.
  CHECK(f.oracle.Admit(kBase, kBase + 1024, 1, ArenaTag{1, 1}).size() == 1);
  // Had it been remembered, another arena could not have it.
  f.AdmitSafely(kBase + 1024, kBase + 2048, 0, ArenaTag{1, 1});

  OracleFixture g;
  g.AdmitSafely(kBase, kBase + 1024, 0, ArenaTag{1, 1});
  g.Enqueue(0);
  g.Retire(kBase);
  g.oracle.ForgetArenas([](const ArenaTag& arena) { return arena.pool == 1; });
  g.AdmitSafely(kBase, kBase + 1024, 1, ArenaTag{3, 1});
}

}  // namespace
}  // namespace testing
}  // namespace tidepool
