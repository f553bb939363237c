// Shared test scaffolding for tests on the simulated device; see sim_harness.h.
#include "tests/testing/sim_harness.h"

#include <catch2/catch.hpp>

#include <memory>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tidepool {
namespace testing {

std::unique_ptr<SimulatedDevice> MakeDevice(size_t capacity, SimulatedDevice::Options options) {
  options.capacity = capacity;
  return std::make_unique<SimulatedDevice>(options);
}

std::unique_ptr<CachingAllocator> MakeAllocator(Device* device, const Config& config) {
  absl::StatusOr<std::unique_ptr<CachingAllocator>> made =
      CachingAllocator::Create(device, config);
  INFO("CachingAllocator::Create: " << made.status().ToString());
  REQUIRE(made.ok());
  return std::move(*made);
}

Stream NewStream(GraphDevice* device) {
  absl::StatusOr<Stream> stream = device->CreateStream();
  INFO("CreateStream: " << stream.status().ToString());
  REQUIRE(stream.ok());
  return *stream;
}

Config ExpandableConfig(bool expandable) {
  Config config;
  config.expandable_segments = expandable;
  return config;
}

SimHarness::SimHarness(const Config& config, size_t capacity, SimulatedDevice::Options options,
                       bool with_stream)
    : device(MakeDevice(capacity, options)), allocator(MakeAllocator(device.get(), config)) {
  if (with_stream) stream = testing::NewStream(device.get());
}

Stream SimHarness::NewStream() { return testing::NewStream(device.get()); }

void* SimHarness::Allocate(size_t bytes, Stream on) {
  absl::StatusOr<void*> ptr = allocator->Allocate(bytes, on);
  INFO("Allocate(" << bytes << "): " << ptr.status().ToString());
  REQUIRE(ptr.ok());
  return *ptr;
}

size_t SimHarness::SizeOf(void* ptr) {
  absl::StatusOr<size_t> size = allocator->BlockSize(ptr);
  INFO("BlockSize: " << size.status().ToString());
  REQUIRE(size.ok());
  return *size;
}

void SimHarness::Free(void* ptr) {
  absl::Status status = allocator->Free(ptr);
  INFO("Free: " << status.ToString());
  REQUIRE(status.ok());
}

void SimHarness::RequireClean() {
  absl::Status status = allocator->EmptyCache();
  INFO("EmptyCache: " << status.ToString());
  REQUIRE(status.ok());
  CHECK(device->used_bytes() == 0);
  CHECK(device->live_segments() == 0);
}

}  // namespace testing
}  // namespace tidepool
