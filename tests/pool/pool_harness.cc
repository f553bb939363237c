// Shared scaffolding for the pool tests; see pool_harness.h.
#include "tests/pool/pool_harness.h"

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tidepool {
namespace testing {

PoolHarness::PoolHarness(bool expandable, size_t capacity, SimulatedDevice::Options options)
    : SimHarness(ExpandableConfig(expandable), capacity, options, /*with_stream=*/false),
      manager(std::make_unique<PoolManager>(allocator.get())) {}

StreamId PoolHarness::IdOf(Stream stream) {
  absl::StatusOr<StreamId> id = device->GetStreamId(stream);
  REQUIRE(id.ok());
  return *id;
}

void PoolHarness::Begin(PoolId pool, const RouteFilter& filter) {
  absl::Status status = manager->Begin(pool, filter);
  INFO("Begin(" << pool.ToString() << ", " << filter.ToString() << "): " << status.ToString());
  REQUIRE(status.ok());
}

void PoolHarness::End(PoolId pool) {
  absl::Status status = manager->End(pool);
  INFO("End(" << pool.ToString() << "): " << status.ToString());
  REQUIRE(status.ok());
}

void PoolHarness::Release(PoolId pool) {
  absl::Status status = manager->Release(pool);
  INFO("Release(" << pool.ToString() << "): " << status.ToString());
  REQUIRE(status.ok());
}

void* PoolHarness::Allocate(size_t bytes, Stream stream) {
  absl::StatusOr<PoolId> route = manager->RouteOf(stream);
  INFO("RouteOf: " << route.status().ToString());
  REQUIRE(route.ok());
  absl::StatusOr<void*> ptr = manager->Allocate(bytes, stream);
  INFO("Allocate(" << bytes << "): " << ptr.status().ToString());
  REQUIRE(ptr.ok());
  REQUIRE(PoolOf(*ptr) == *route);
  return *ptr;
}

PoolId PoolHarness::RouteOf(Stream stream) {
  absl::StatusOr<PoolId> route = manager->RouteOf(stream);
  INFO("RouteOf: " << route.status().ToString());
  REQUIRE(route.ok());
  return *route;
}

PoolId PoolHarness::PoolOf(const void* ptr) {
  absl::StatusOr<PoolId> pool = manager->PoolOf(ptr);
  INFO("PoolOf: " << pool.status().ToString());
  REQUIRE(pool.ok());
  return *pool;
}

PoolInfo PoolHarness::Info(PoolId pool) {
  absl::StatusOr<PoolInfo> info = manager->Info(pool);
  INFO("Info(" << pool.ToString() << "): " << info.status().ToString());
  REQUIRE(info.ok());
  return *info;
}

AllocatorStats PoolHarness::Stats(PoolId pool) {
  absl::StatusOr<AllocatorStats> stats = manager->Stats(pool);
  INFO("Stats(" << pool.ToString() << "): " << stats.status().ToString());
  REQUIRE(stats.ok());
  return *stats;
}

}  // namespace testing
}  // namespace tidepool
