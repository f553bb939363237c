// The symmetric segment source (nccl/symmetric_segments.h) against the fake NCCL
// (tests/nccl/fake_nccl.cc), whose violation counter every case requires to stay at zero:
// exactly one registration per segment, deregistration before free, nothing left behind by a
// failed or NULL registration, nothing registered during a capture, and registration calls on
// one communicator never at once, from many threads.
#include <dlfcn.h>

#include <atomic>
#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "catch2/catch.hpp"
#include "nccl/nccl_library.h"
#include "nccl/symmetric_segments.h"
#include "tests/nccl/fake_nccl_controls.h"

namespace tidepool {
namespace {

using testing::Fake;
using testing::TheFake;

ncclComm_t Communicator(int n) { return testing::FakeCommunicator(n); }

TEST_CASE("a segment is registered once, and deregistered before it is freed") {
  Fake& fake = TheFake();
  {
    SymmetricSegments segments(fake.nccl.get(), Communicator(0), [] { return 0; });
    absl::StatusOr<SymmetricSegment> first = segments.Create(1 << 20);
    absl::StatusOr<SymmetricSegment> second = segments.Create(3 << 20);
    REQUIRE(first.ok());
    REQUIRE(second.ok());
    CHECK(first->window != nullptr);
    CHECK(first->ordinal == 0);
    CHECK(second->ordinal == 1);
    CHECK(fake.live_windows() == 2);
    CHECK(fake.registrations() == 2);
    REQUIRE(segments.Destroy(*first).ok());
    CHECK(fake.live_windows() == 1);
    CHECK(fake.live_allocations() == 1);
    // Not held any more: refused, and nothing is freed twice.
    CHECK(absl::IsInvalidArgument(segments.Destroy(*first)));
    CHECK(segments.segments().size() == 1);
    CHECK(segments.registrations() == 2);
    CHECK(segments.deregistrations() == 1);
  }
  // The destructor gave back what was left, in the right order.
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.violations() == 0);
}

TEST_CASE("a failed or NULL registration leaves nothing behind") {
  Fake& fake = TheFake();
  SymmetricSegments segments(fake.nccl.get(), Communicator(1), [] { return 0; });
  fake.fail_next_register();
  absl::StatusOr<SymmetricSegment> failed = segments.Create(1 << 20);
  CHECK(absl::IsInternal(failed.status()));
  CHECK(failed.status().message().find("ncclCommWindowRegister") != std::string::npos);
  fake.set_null_windows(1);
  absl::StatusOr<SymmetricSegment> null_window = segments.Create(1 << 20);
  CHECK(absl::IsFailedPrecondition(null_window.status()));
  CHECK(null_window.status().message().find("no symmetric memory support") != std::string::npos);
  fake.set_null_windows(0);
  CHECK(segments.segments().empty());
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.live_windows() == 0);
  // And the next one works.
  absl::StatusOr<SymmetricSegment> next = segments.Create(1 << 20);
  REQUIRE(next.ok());
  REQUIRE(segments.Destroy(*next).ok());
  CHECK(fake.violations() == 0);
}

TEST_CASE("nothing registers or deregisters during a capture") {
  Fake& fake = TheFake();
  std::atomic<int> captures{0};
  SymmetricSegments segments(fake.nccl.get(), Communicator(2), [&] { return captures.load(); });
  absl::StatusOr<SymmetricSegment> before = segments.Create(1 << 20);
  REQUIRE(before.ok());
  captures = 1;
  absl::StatusOr<SymmetricSegment> during = segments.Create(1 << 20);
  CHECK(absl::IsFailedPrecondition(during.status()));
  CHECK(during.status().message().find("Reserve the symmetric pool before capturing") !=
        std::string::npos);
  CHECK(absl::IsFailedPrecondition(segments.Destroy(*before)));
  CHECK(fake.registrations() == 1);
  CHECK(fake.live_windows() == 1);
  captures = 0;
  REQUIRE(segments.Destroy(*before).ok());
  CHECK(fake.violations() == 0);
}

TEST_CASE("registrations on one communicator never run at once, from many threads and pools") {
  Fake& fake = TheFake();
  // Two pools on one communicator (as two devices' pools of one process might be) and one on
  // another; the fake counts any two register/deregister calls on a communicator at once.
  SymmetricSegments a(fake.nccl.get(), Communicator(3), [] { return 0; });
  SymmetricSegments b(fake.nccl.get(), Communicator(3), [] { return 0; });
  SymmetricSegments c(fake.nccl.get(), Communicator(4), [] { return 0; });
  std::vector<std::thread> threads;
  std::atomic<int> failures{0};
  for (SymmetricSegments* pool : {&a, &b, &c, &a, &b, &c}) {
    threads.emplace_back([pool, &failures] {
      for (int i = 0; i < 200; ++i) {
        absl::StatusOr<SymmetricSegment> segment = pool->Create(4096 * (1 + i % 3));
        if (!segment.ok() || !pool->Destroy(*segment).ok()) ++failures;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  CHECK(failures == 0);
  CHECK(fake.registrations() == 1200);
  CHECK(fake.live_windows() == 0);
  CHECK(fake.live_allocations() == 0);
  CHECK(fake.violations() == 0);
}

}  // namespace
}  // namespace tidepool
