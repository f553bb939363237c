// Symmetric pools as pools of the runtime (nccl/symmetric_registry.h, nccl/symmetric_scope.h),
// with ranks as threads (thread_agreement.h), each rank a runtime of its own over a simulated
// device, and the fake NCCL (fake_nccl.cc) underneath:
//   * a thread routed to a symmetric pool by the ordinary begin gets its buffers there, at the
//     same segment and offset on every rank; the ordinary free, pool_of, stats, snapshot and
//     trim reach the pool; destroy gives every window and allocation back;
//   * a SymmetricScope inside a capture sends this thread's allocations to the symmetric pool
//     and then back to the capture's, with references balanced, while other threads keep
//     allocating into the capture's pool; growth inside the capture is refused;
//   * misuse (a second pool for a communicator, a foreign communicator or id, a destroyed pool,
//     record_stream, destroy while buffers are live or routed, a double free) is refused and
//     changes nothing.
// The fake's violation counter stays at zero throughout.
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "catch2/catch.hpp"
#include "graph/capture.h"
#include "nccl/symmetric_registry.h"
#include "nccl/symmetric_scope.h"
#include "runtime/runtime.h"
#include "tests/nccl/fake_nccl_controls.h"
#include "tests/nccl/thread_agreement.h"
#include "trace/recorder.h"
#include "trace/trace.h"

namespace tidepool {
namespace {

using testing::Fake;
using testing::OnEveryRank;
using testing::ThreadAgreement;
using testing::ThreadGroup;
using testing::TheFake;

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

// One rank: a runtime of its own over a simulated device, and its registry.
struct Rank {
  explicit Rank(int rank) {
    SimulatedDevice::Options options;
    options.base_address = uintptr_t{0x100000000000} * (rank + 1);
    device = std::make_unique<SimulatedDevice>(options);
    absl::StatusOr<std::unique_ptr<Runtime>> made = Runtime::Create({device.get()}, Config{});
    REQUIRE(made.ok());
    runtime = *std::move(made);
    registry = std::make_unique<SymmetricRegistry>(runtime.get());
  }
  ~Rank() {
    registry.reset();
    runtime.reset();
  }
  PoolManager& pools() { return **runtime->Pools(0); }

  std::unique_ptr<SimulatedDevice> device;
  std::unique_ptr<Runtime> runtime;
  std::unique_ptr<SymmetricRegistry> registry;
};

SymmetricPool::Options Growing(size_t growth_bytes) {
  SymmetricPool::Options options;
  options.growth_bytes = growth_bytes;
  options.agreement_timeout = absl::Seconds(20);
  return options;
}

PoolId CreatePool(Fake& fake, Rank& rank, ThreadGroup* group, int r, int ranks, int communicator,
                  const SymmetricPool::Options& options) {
  absl::StatusOr<PoolId> id =
      rank.registry->Create(0, testing::FakeCommunicator(communicator), fake.nccl.get(),
                            std::make_unique<ThreadAgreement>(group, r, ranks), options);
  INFO(id.status().ToString());
  REQUIRE(id.ok());
  return *id;
}

TEST_CASE("a symmetric pool is a pool of the runtime: routed, freed, traced and trimmed like any") {
  Fake& fake = TheFake();
  constexpr int kRanks = 2;
  ThreadGroup group(kRanks);
  std::vector<std::unique_ptr<Rank>> ranks;
  for (int r = 0; r < kRanks; ++r) ranks.push_back(std::make_unique<Rank>(r));
  // Per rank: the (segment, offset) of each buffer, and any failure, checked on the main thread.
  std::vector<std::vector<std::pair<uint64_t, size_t>>> placed(kRanks);
  std::vector<std::string> errors(kRanks);
  OnEveryRank(kRanks, [&](int r) {
    Rank& rank = *ranks[r];
    auto fail = [&](const std::string& what, const absl::Status& status) {
      if (errors[r].empty()) errors[r] = what + ": " + status.ToString();
    };
    absl::StatusOr<PoolId> id =
        rank.registry->Create(0, testing::FakeCommunicator(200 + r), fake.nccl.get(),
                              std::make_unique<ThreadAgreement>(&group, r, kRanks),
                              Growing(2 * kMiB));
    if (!id.ok()) return fail("create", id.status());
    if (absl::Status s = rank.registry->Reserve(0, *id, 4 * kMiB); !s.ok()) {
      return fail("reserve", s);
    }
    // sglang's order, through the runtime: begin, allocate, end, release.
    if (absl::Status s = rank.runtime->BeginAllocateCurrentThreadToPool(0, *id); !s.ok()) {
      return fail("begin", s);
    }
    std::vector<void*> buffers;
    for (size_t bytes : {4 * kKiB, 1 * kMiB, 100 * kKiB, 3 * kMiB /* grows */, 8 * kKiB}) {
      absl::StatusOr<void*> buffer = rank.runtime->Allocate(0, bytes, nullptr);
      if (!buffer.ok()) return fail("allocate", buffer.status());
      buffers.push_back(*buffer);
    }
    if (absl::Status s = rank.runtime->EndAllocateToPool(0, *id); !s.ok()) return fail("end", s);
    if (absl::Status s = rank.runtime->ReleasePool(0, *id); !s.ok()) return fail("release", s);
    // After the end, this thread's allocations go to the device's default pool again.
    absl::StatusOr<void*> ordinary = rank.runtime->Allocate(0, 4 * kKiB, nullptr);
    if (!ordinary.ok()) return fail("ordinary allocate", ordinary.status());
    absl::StatusOr<BlockHome> ordinary_home = rank.runtime->HomeOf(*ordinary);
    if (!ordinary_home.ok() || !ordinary_home->pool.is_default()) {
      return fail("ordinary home", ordinary_home.status());
    }
    for (void* buffer : buffers) {
      absl::StatusOr<BlockHome> home = rank.runtime->HomeOf(buffer);
      if (!home.ok()) return fail("home", home.status());
      if (home->pool != *id) return fail("home", absl::InternalError(home->pool.ToString()));
      absl::StatusOr<SymmetricPool::Location> location = rank.registry->Lookup(buffer);
      if (!location.ok()) return fail("lookup", location.status());
      if (location->window == nullptr) return fail("lookup", absl::InternalError("no window"));
      placed[r].emplace_back(location->segment, location->offset);
    }
    // The pool's stats and snapshot come through the pool manager.
    absl::StatusOr<AllocatorStats> stats = rank.pools().Stats(*id);
    if (!stats.ok() || stats->active_blocks.current != 5 || stats->segments.current != 2) {
      return fail("stats", stats.ok() ? absl::InternalError(stats->ToJson()) : stats.status());
    }
    absl::StatusOr<std::string> snapshot = rank.pools().Snapshot(*id);
    if (!snapshot.ok() || snapshot->find("\"window\"") == std::string::npos) {
      return fail("snapshot", snapshot.status());
    }
    // Destroy is refused while buffers are live, and changes nothing.
    if (absl::Status s = rank.registry->Destroy(0, *id); !absl::IsFailedPrecondition(s)) {
      return fail("destroy with live buffers", s);
    }
    // The ordinary free; a second free of one buffer is refused.
    for (void* buffer : buffers) {
      if (absl::Status s = rank.runtime->Free(buffer); !s.ok()) return fail("free", s);
    }
    if (absl::Status s = rank.runtime->Free(buffers[0]); !absl::IsFailedPrecondition(s)) {
      return fail("double free", s);
    }
    if (absl::Status s = rank.runtime->Free(*ordinary); !s.ok()) return fail("free", s);
    // The pool manager's trim is the collective trim: both segments go.
    if (absl::Status s = rank.pools().Trim(*id); !s.ok()) return fail("trim", s);
    absl::StatusOr<AllocatorStats> trimmed = rank.pools().Stats(*id);
    if (!trimmed.ok() || trimmed->segments.current != 0) return fail("trimmed", trimmed.status());
    if (absl::Status s = rank.registry->Destroy(0, *id); !s.ok()) return fail("destroy", s);
    // A destroyed pool's id is refused everywhere.
    if (absl::Status s = rank.runtime->BeginAllocateCurrentThreadToPool(0, *id);
        !absl::IsFailedPrecondition(s)) {
      return fail("begin after destroy", s);
    }
    if (absl::Status s = rank.registry->Reserve(0, *id, kMiB); !absl::IsNotFound(s)) {
      return fail("reserve after destroy", s);
    }
  });
  for (int r = 0; r < kRanks; ++r) {
    INFO("rank " << r << ": " << errors[r]);
    CHECK(errors[r].empty());
  }
  REQUIRE(placed[0].size() == 5);
  CHECK(placed[0] == placed[1]);
  // The 3 MiB buffer did not fit the 4 MiB reserve after 1 MiB + 100 KiB: it went to segment 1.
  CHECK(placed[0][3].first == 1);
  CHECK(placed[0][0] == std::make_pair(uint64_t{0}, size_t{0}));
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a SymmetricScope inside a capture pauses the capture's routing for its thread only") {
  Fake& fake = TheFake();
  ThreadGroup group(1);
  Rank rank(0);
  const ncclComm_t comm = testing::FakeCommunicator(300);
  const PoolId symmetric = CreatePool(fake, rank, &group, 0, 1, 300, Growing(2 * kMiB));
  REQUIRE(rank.registry->Reserve(0, symmetric, 2 * kMiB).ok());
  const int64_t windows_before = fake.live_windows();

  absl::StatusOr<Stream> stream = rank.device->CreateStream();
  REQUIRE(stream.ok());
  absl::StatusOr<graph::Capture> capture =
      graph::Capture::Begin(rank.device.get(), &rank.pools(), *stream);
  REQUIRE(capture.ok());
  const PoolId graph_pool = capture->pool();
  const PoolInfo graph_before = *rank.pools().Info(graph_pool);

  absl::StatusOr<void*> captured = rank.runtime->Allocate(0, 64 * kKiB, *stream);
  REQUIRE(captured.ok());
  CHECK(rank.runtime->HomeOf(*captured)->pool == graph_pool);
  void* symmetric_buffer = nullptr;
  {
    SymmetricScope scope(rank.runtime.get(), rank.registry.get(), comm);
    REQUIRE(scope.status().ok());
    CHECK(scope.pool() == symmetric);
    absl::StatusOr<void*> inside = rank.runtime->Allocate(0, 256 * kKiB, *stream);
    REQUIRE(inside.ok());
    symmetric_buffer = *inside;
    CHECK(rank.runtime->HomeOf(symmetric_buffer)->pool == symmetric);
    // Another thread allocating on the capturing stream still goes to the capture's pool.
    PoolId other_thread_pool;
    std::thread other([&] {
      absl::StatusOr<void*> block = rank.runtime->Allocate(0, 32 * kKiB, *stream);
      REQUIRE(block.ok());
      other_thread_pool = rank.runtime->HomeOf(*block)->pool;
      REQUIRE(rank.runtime->Free(*block).ok());
    });
    other.join();
    CHECK(other_thread_pool == graph_pool);
    // A growth inside the capture is refused before any rank is asked, and nothing registers.
    absl::StatusOr<void*> too_big = rank.runtime->Allocate(0, 8 * kMiB, *stream);
    CHECK(absl::IsFailedPrecondition(too_big.status()));
    CHECK(fake.live_windows() == windows_before);
    // Scopes nest.
    {
      SymmetricScope inner(rank.runtime.get(), rank.registry.get(), 0, symmetric);
      REQUIRE(inner.status().ok());
      absl::StatusOr<void*> nested = rank.runtime->Allocate(0, 4 * kKiB, *stream);
      REQUIRE(nested.ok());
      CHECK(rank.runtime->HomeOf(*nested)->pool == symmetric);
      REQUIRE(rank.runtime->Free(*nested).ok());
    }
    CHECK(rank.pools().Info(symmetric)->references == 2);  // the registry's and the scope's
  }
  // The capture's routing is back for this thread, and every reference is as it was.
  absl::StatusOr<void*> after = rank.runtime->Allocate(0, 64 * kKiB, *stream);
  REQUIRE(after.ok());
  CHECK(rank.runtime->HomeOf(*after)->pool == graph_pool);
  const PoolInfo symmetric_after = *rank.pools().Info(symmetric);
  CHECK(symmetric_after.references == 1);
  CHECK(symmetric_after.routes == 0);
  const PoolInfo graph_after = *rank.pools().Info(graph_pool);
  CHECK(graph_after.references == graph_before.references);
  CHECK(graph_after.routes == graph_before.routes);

  REQUIRE(rank.runtime->Free(*captured).ok());
  REQUIRE(rank.runtime->Free(*after).ok());
  REQUIRE(capture->End().ok());
  REQUIRE(rank.runtime->Free(symmetric_buffer).ok());
  REQUIRE(rank.registry->Destroy(0, symmetric).ok());
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a recorded trace has the symmetric pool's allocations and frees") {
  Fake& fake = TheFake();
  ThreadGroup group(1);
  Rank rank(0);
  const char* folder = std::getenv("TEST_TMPDIR");
  const std::string path = std::string(folder != nullptr ? folder : "/tmp") + "/symmetric.csv";
  absl::StatusOr<std::unique_ptr<TraceRecorder>> recorder = TraceRecorder::Open(path);
  REQUIRE(recorder.ok());
  rank.runtime->RecordTo(*std::move(recorder));
  const ncclComm_t comm = testing::FakeCommunicator(350);
  const PoolId id = CreatePool(fake, rank, &group, 0, 1, 350, Growing(kMiB));
  void* buffer = nullptr;
  {
    SymmetricScope scope(rank.runtime.get(), rank.registry.get(), comm);
    REQUIRE(scope.status().ok());
    absl::StatusOr<void*> made = rank.runtime->Allocate(0, 100 * kKiB, nullptr);  // grows
    REQUIRE(made.ok());
    buffer = *made;
  }
  REQUIRE(rank.runtime->HomeOf(buffer)->pool == id);
  REQUIRE(rank.runtime->Free(buffer).ok());
  REQUIRE(rank.runtime->recorder()->Flush().ok());
  absl::StatusOr<Trace> trace = ReadTrace(path);
  INFO(trace.status().ToString());
  REQUIRE(trace.ok());
  REQUIRE(trace->events.size() == 2);
  CHECK(trace->events[0].action == TraceAction::kAllocate);
  CHECK(trace->events[0].pointer == reinterpret_cast<uintptr_t>(buffer));
  CHECK(trace->events[0].size == 100 * kKiB);
  CHECK(trace->events[1].action == TraceAction::kFree);
  CHECK(trace->events[1].pointer == reinterpret_cast<uintptr_t>(buffer));
  REQUIRE(rank.registry->Destroy(0, id).ok());
  CHECK(fake.live_windows() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("misuse of symmetric pools is refused and changes nothing") {
  Fake& fake = TheFake();
  ThreadGroup group(1);
  Rank rank(0);
  const ncclComm_t comm = testing::FakeCommunicator(400);
  const PoolId id = CreatePool(fake, rank, &group, 0, 1, 400, Growing(0));
  REQUIRE(rank.registry->Reserve(0, id, kMiB).ok());

  SECTION("a second pool for one communicator, a null one, an unknown device") {
    ThreadGroup other_group(1);
    CHECK(absl::IsAlreadyExists(
        rank.registry
            ->Create(0, comm, fake.nccl.get(), std::make_unique<ThreadAgreement>(&other_group, 0, 1),
                     Growing(0))
            .status()));
    CHECK(absl::IsInvalidArgument(
        rank.registry
            ->Create(0, nullptr, fake.nccl.get(),
                     std::make_unique<ThreadAgreement>(&other_group, 0, 1), Growing(0))
            .status()));
    CHECK(absl::IsNotFound(
        rank.registry
            ->Create(3, testing::FakeCommunicator(401), fake.nccl.get(),
                     std::make_unique<ThreadAgreement>(&other_group, 0, 1), Growing(0))
            .status()));
  }
  SECTION("a foreign communicator or id") {
    CHECK(absl::IsNotFound(rank.registry->FindByCommunicator(testing::FakeCommunicator(499))
                               .status()));
    SymmetricScope foreign(rank.runtime.get(), rank.registry.get(), testing::FakeCommunicator(499));
    CHECK(absl::IsNotFound(foreign.status()));
    CHECK(rank.pools().RouteOf(nullptr)->is_default());
    CHECK(absl::IsNotFound(rank.registry->Reserve(0, PoolId{0, 987654}, kMiB)));
    CHECK(absl::IsNotFound(rank.registry->Reserve(1, id, kMiB)));
    // An ordinary pool's id is not a symmetric pool.
    REQUIRE(rank.pools().Create(PoolId{0, 987655}, PoolOptions{}).ok());
    CHECK(absl::IsNotFound(rank.registry->Find(0, PoolId{0, 987655}).status()));
  }
  SECTION("record_stream, a full pool, destroy while routed or live") {
    REQUIRE(rank.runtime->BeginAllocateCurrentThreadToPool(0, id).ok());
    absl::StatusOr<void*> buffer = rank.runtime->Allocate(0, 512 * kKiB, nullptr);
    REQUIRE(buffer.ok());
    // The pool may not grow outside Reserve here: the allocation fails in words.
    CHECK(absl::IsResourceExhausted(rank.runtime->Allocate(0, 2 * kMiB, nullptr).status()));
    CHECK(absl::IsFailedPrecondition(rank.runtime->RecordStream(*buffer, nullptr)));
    CHECK(absl::IsFailedPrecondition(rank.registry->Destroy(0, id)));  // routed and live
    REQUIRE(rank.runtime->EndAllocateToPool(0, id).ok());
    REQUIRE(rank.runtime->ReleasePool(0, id).ok());
    CHECK(absl::IsFailedPrecondition(rank.registry->Destroy(0, id)));  // live
    // Trim with a live buffer keeps its segment and the buffer.
    REQUIRE(rank.pools().Trim(id).ok());
    CHECK(rank.registry->Lookup(*buffer).ok());
    CHECK(rank.pools().Stats(id)->segments.current == 1);
    // A pointer inside a buffer is not a buffer.
    CHECK(absl::IsFailedPrecondition(rank.runtime->Free(static_cast<char*>(*buffer) + 512)));
    REQUIRE(rank.runtime->Free(*buffer).ok());
    // The registry's own reference is not the ordinary release's to drop: destroy ends the pool.
    CHECK(absl::IsFailedPrecondition(rank.runtime->ReleasePool(0, id)));
    REQUIRE(rank.registry->Destroy(0, id).ok());
    CHECK(absl::IsFailedPrecondition(rank.runtime->BeginAllocateCurrentThreadToPool(0, id)));
    CHECK(absl::IsFailedPrecondition(rank.runtime->ReleasePool(0, id)));
    SymmetricScope gone(rank.runtime.get(), rank.registry.get(), 0, id);
    CHECK(absl::IsNotFound(gone.status()));
    CHECK(fake.live_windows() == 0);
  }
  CHECK(fake.violations() == 0);
}

}  // namespace
}  // namespace tidepool
