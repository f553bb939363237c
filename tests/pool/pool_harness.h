// Shared scaffolding for the pool tests (pool/pool_manager.h, docs/pools.md): a PoolHarness, the
// simulated-device harness of tests/testing/sim_harness.h with a PoolManager on its allocator and
// helpers for Begin / End / Release / RouteOf / PoolOf / Info / Stats that REQUIRE success and say
// the status when they fail; and a Catch StringMaker so that failures print PoolIds.
#ifndef TIDEPOOL_TESTS_POOL_POOL_HARNESS_H_
#define TIDEPOOL_TESTS_POOL_POOL_HARNESS_H_

#include <catch2/catch.hpp>

#include <cstddef>
#include <memory>
#include <string>

#include "allocator/simulated_device.h"
#include "allocator/stats.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"
#include "tests/testing/sim_harness.h"

// Catch prints PoolIds in failures.
namespace Catch {
template <>
struct StringMaker<tidepool::PoolId> {
  static std::string convert(const tidepool::PoolId& id) { return id.ToString(); }
};
}  // namespace Catch

namespace tidepool {
namespace testing {

// One simulated device, its allocator and its pool manager (destroyed in that reverse order).
// No stream is made at construction; tests make theirs with NewStream.
struct PoolHarness : SimHarness {
  explicit PoolHarness(bool expandable = true, size_t capacity = kGiB,
                       SimulatedDevice::Options options = {});

  StreamId IdOf(Stream stream);

  void Begin(PoolId pool, const RouteFilter& filter);
  void End(PoolId pool);
  void Release(PoolId pool);

  // An allocation through the manager; checks that it lands where RouteOf said it would.
  void* Allocate(size_t bytes, Stream stream);

  PoolId RouteOf(Stream stream);
  PoolId PoolOf(const void* ptr);
  PoolInfo Info(PoolId pool);
  AllocatorStats Stats(PoolId pool);

  std::unique_ptr<PoolManager> manager;
};

}  // namespace testing
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_POOL_POOL_HARNESS_H_
