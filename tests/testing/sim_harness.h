// Shared test scaffolding for tests on the simulated device (allocator/simulated_device.h): how
// to make a device, a CachingAllocator on it and a stream, and a SimHarness that holds all three
// with Allocate / Free / SizeOf helpers that REQUIRE success (printing the status when they fail)
// and RequireClean, the end-of-test check that nothing is left on the device.
#ifndef TIDEPOOL_TESTS_TESTING_SIM_HARNESS_H_
#define TIDEPOOL_TESTS_TESTING_SIM_HARNESS_H_

#include <cstddef>
#include <memory>

#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "allocator/simulated_device.h"

namespace tidepool {
namespace testing {

constexpr size_t kGiB = size_t{1} << 30;

// A simulated device of `capacity` bytes; the other options are taken from `options`.
std::unique_ptr<SimulatedDevice> MakeDevice(size_t capacity,
                                            SimulatedDevice::Options options = {});

// A CachingAllocator on `device`; REQUIREs that Create succeeds.
std::unique_ptr<CachingAllocator> MakeAllocator(Device* device, const Config& config);

// A new stream on `device` (streams are made by a GraphDevice, never by the core's Device);
// REQUIREs that CreateStream succeeds.
Stream NewStream(GraphDevice* device);

// A Config with only expandable_segments set.
Config ExpandableConfig(bool expandable);

// One simulated device and its caching allocator (destroyed in that reverse order), and a stream
// made at construction unless `with_stream` is false (then `stream` stays null).
struct SimHarness {
  explicit SimHarness(const Config& config, size_t capacity = kGiB,
                      SimulatedDevice::Options options = {}, bool with_stream = true);

  Stream NewStream();

  // Allocate on `stream` (by default the harness's own); REQUIREs success.
  void* Allocate(size_t bytes) { return Allocate(bytes, stream); }
  void* Allocate(size_t bytes, Stream on);
  // The size BlockSize answers for a live block; REQUIREs success.
  size_t SizeOf(void* ptr);
  // Free; REQUIREs success.
  void Free(void* ptr);

  // After the test: everything freed, the cache emptied, nothing left on the device.
  void RequireClean();

  std::unique_ptr<SimulatedDevice> device;
  std::unique_ptr<CachingAllocator> allocator;
  Stream stream = nullptr;
};

}  // namespace testing
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_TESTING_SIM_HARNESS_H_
