// The device contract (tests/testing/device_contract.h) on the simulated device, the device every
// other CPU test of the core runs on: as tidepool and replay make it, as a small device that the
// capacity clause can fill, and behind a ForwardingDevice (the base of the tests' decorators),
// which must forward every call faithfully. tests/gpu/device_contract_test runs the same clauses
// on CudaDevice.
//
// The second test hands each clause a device broken on purpose, one call at a time, and
// requires the clause to find it: a clause that cannot fail would prove nothing on either device.
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/device.h"
#include "allocator/forwarding_device.h"
#include "allocator/graph_device.h"
#include "allocator/simulated_device.h"
#include "catch2/catch.hpp"
#include "tests/testing/device_contract.h"

namespace tidepool {
namespace {

using testing::device_contract::Check;
using testing::device_contract::ClauseNamed;
using testing::device_contract::Clauses;
using testing::device_contract::Findings;
using testing::device_contract::RunDeviceContract;
using testing::device_contract::Subject;

constexpr size_t kMiB = size_t{1} << 20;

// Work on a simulated stream: one unit on its logical clock, pending until synchronized.
std::function<absl::Status(Stream)> EnqueueOn(SimulatedDevice* device) {
  return [device](Stream stream) {
    device->Enqueue(stream);
    return absl::OkStatus();
  };
}

// 64 MiB in granules of 1 MiB: small enough for the capacity clause to fill at once.
SimulatedDevice::Options SmallOptions() {
  SimulatedDevice::Options options;
  options.capacity = 64 * kMiB;
  options.granularity = kMiB;
  return options;
}

// The simulated device as tidepool makes it (80 GiB, 2 MiB granules). Nothing is backed by host
// memory, so even this one can be filled.
struct DefaultSimulated {
  static constexpr const char* kName = "SimulatedDevice (default options)";
  SimulatedDevice device;
  Subject subject() {
    return Subject{&device, SimulatedDevice::Options{}.capacity, EnqueueOn(&device)};
  }
};

struct SmallSimulated {
  static constexpr const char* kName = "SimulatedDevice (64 MiB, 1 MiB granules)";
  SimulatedDevice device{SmallOptions()};
  Subject subject() { return Subject{&device, SmallOptions().capacity, EnqueueOn(&device)}; }
};

struct ForwardedSimulated {
  static constexpr const char* kName = "ForwardingDevice over a SimulatedDevice";
  SimulatedDevice inner{SmallOptions()};
  ForwardingDevice device{&inner};
  Subject subject() { return Subject{&device, SmallOptions().capacity, EnqueueOn(&inner)}; }
};

TEMPLATE_TEST_CASE("the simulated device keeps the device contract", "[device_contract]",
                   DefaultSimulated, SmallSimulated, ForwardedSimulated) {
  RunDeviceContract<TestType>();
}

// --- Each clause can fail ------------------------------------------------------------------------
// Devices that break one promise each, over a small simulated device.

class OddGranularity : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  size_t granularity() const override { return 3 * ForwardingDevice::granularity(); }
};

class FreeAboveTotal : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<MemoryInfo> GetMemoryInfo() override {
    absl::StatusOr<MemoryInfo> info = ForwardingDevice::GetMemoryInfo();
    if (info.ok()) info->free_bytes = info->total_bytes + 1;
    return info;
  }
};

// Hands out segments 16 bytes past what the device gave.
class MisalignedSegments : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) override {
    absl::StatusOr<uintptr_t> address = ForwardingDevice::AllocateSegment(bytes);
    if (address.ok()) *address += 16;
    return address;
  }
  absl::Status FreeSegment(uintptr_t address, size_t bytes) override {
    return ForwardingDevice::FreeSegment(address - 16, bytes);
  }
};

// Says the segment is freed, and keeps it.
class KeepsFreedSegments : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::Status FreeSegment(uintptr_t, size_t) override { return absl::OkStatus(); }
};

// Out of memory in a code the core does not recover from.
class OutOfMemoryAsInternal : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) override {
    absl::StatusOr<uintptr_t> address = ForwardingDevice::AllocateSegment(bytes);
    if (absl::IsResourceExhausted(address.status())) {
      return absl::InternalError(address.status().message());
    }
    return address;
  }
};

// Rounds a reservation up to the granularity instead of refusing it.
class RoundsReservations : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<uintptr_t> ReserveAddressRange(size_t bytes) override {
    return ForwardingDevice::ReserveAddressRange(Rounded(bytes));
  }
  absl::Status ReleaseAddressRange(uintptr_t address, size_t bytes) override {
    return ForwardingDevice::ReleaseAddressRange(address, Rounded(bytes));
  }

 private:
  size_t Rounded(size_t bytes) const {
    const size_t g = granularity();
    return (bytes + g - 1) / g * g;
  }
};

// Says the chunk is released, and keeps it.
class KeepsReleasedChunks : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::Status ReleasePhysical(PhysicalHandle) override { return absl::OkStatus(); }
};

class EventsAlwaysComplete : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<bool> QueryEvent(Event event) override {
    absl::StatusOr<bool> done = ForwardingDevice::QueryEvent(event);
    if (!done.ok()) return done;
    return true;
  }
};

class StreamSynchronizeWaitsForNothing : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::Status SynchronizeStream(Stream) override { return absl::OkStatus(); }
};

class DeviceSynchronizeWaitsForNothing : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::Status SynchronizeDevice() override { return absl::OkStatus(); }
};

// Ids from a small set, so new streams get ids old ones had.
class RecyclesStreamIds : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<StreamId> GetStreamId(Stream stream) override {
    absl::StatusOr<StreamId> id = ForwardingDevice::GetStreamId(stream);
    if (id.ok()) *id %= 3;
    return id;
  }
};

class StreamIdsWithTopBit : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<StreamId> GetStreamId(Stream stream) override {
    absl::StatusOr<StreamId> id = ForwardingDevice::GetStreamId(stream);
    if (id.ok()) *id |= kCapturingStreamIdBit;
    return id;
  }
};

class NeverCapturing : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<CaptureInfo> GetCaptureInfo(Stream stream) override {
    absl::StatusOr<CaptureInfo> info = ForwardingDevice::GetCaptureInfo(stream);
    if (!info.ok()) return info;
    return CaptureInfo{};
  }
};

// Every capture gets the same id.
class OneCaptureId : public ForwardingDevice {
 public:
  using ForwardingDevice::ForwardingDevice;
  absl::StatusOr<uint64_t> BeginCapture(Stream stream, CaptureMode mode) override {
    absl::StatusOr<uint64_t> id = ForwardingDevice::BeginCapture(stream, mode);
    if (!id.ok()) return id;
    return uint64_t{1};
  }
  absl::StatusOr<CaptureInfo> GetCaptureInfo(Stream stream) override {
    absl::StatusOr<CaptureInfo> info = ForwardingDevice::GetCaptureInfo(stream);
    if (info.ok() && info->capturing) info->capture_id = 1;
    return info;
  }
};

struct Breakage {
  const char* clause;
  const char* how;
  std::function<std::unique_ptr<GraphDevice>(SimulatedDevice*)> wrap;
};

template <typename Broken>
std::function<std::unique_ptr<GraphDevice>(SimulatedDevice*)> Wrap() {
  return [](SimulatedDevice* inner) { return std::make_unique<Broken>(inner); };
}

std::vector<Breakage> Breakages() {
  return {
      {"granularity is a fixed power of two", "granularity() of 3 MiB", Wrap<OddGranularity>()},
      {"memory info: total is fixed and not below free", "more free bytes than total",
       Wrap<FreeAboveTotal>()},
      {"plain segments: aligned, disjoint, counted, given back", "segments 16 bytes off",
       Wrap<MisalignedSegments>()},
      {"plain segments: aligned, disjoint, counted, given back", "FreeSegment keeps the memory",
       Wrap<KeepsFreedSegments>()},
      {"a request beyond the whole device is RESOURCE_EXHAUSTED", "out of memory as INTERNAL",
       Wrap<OutOfMemoryAsInternal>()},
      {"virtual memory: reserve, create, map, unmap, release",
       "reservations that are not granule multiples rounded up", Wrap<RoundsReservations>()},
      {"capacity runs out with RESOURCE_EXHAUSTED and comes back",
       "ReleasePhysical keeps the memory", Wrap<KeepsReleasedChunks>()},
      {"events follow the work recorded before them", "QueryEvent always true",
       Wrap<EventsAlwaysComplete>()},
      {"events follow the work recorded before them", "SynchronizeStream waits for nothing",
       Wrap<StreamSynchronizeWaitsForNothing>()},
      {"SynchronizeDevice waits for every stream", "SynchronizeDevice waits for nothing",
       Wrap<DeviceSynchronizeWaitsForNothing>()},
      {"stream ids are distinct, stable and never reused", "ids recycled",
       Wrap<RecyclesStreamIds>()},
      {"stream ids are distinct, stable and never reused", "ids with the top bit",
       Wrap<StreamIdsWithTopBit>()},
      {"capture info follows BeginCapture and EndCapture", "no stream ever captures",
       Wrap<NeverCapturing>()},
      {"capture info follows BeginCapture and EndCapture", "every capture has id 1",
       Wrap<OneCaptureId>()},
      {"CaptureSafeStreamId marks a capturing stream only", "no stream ever captures",
       Wrap<NeverCapturing>()},
  };
}

TEST_CASE("every clause of the device contract finds a device that breaks it",
          "[device_contract]") {
  absl::flat_hash_set<std::string> covered;
  for (const Breakage& breakage : Breakages()) covered.insert(breakage.clause);
  for (const auto& clause : Clauses()) {
    INFO("no broken device tries the clause \"" << clause.name << "\"");
    CHECK(covered.contains(clause.name));
  }

  for (const Breakage& breakage : Breakages()) {
    DYNAMIC_SECTION(breakage.clause << " / " << breakage.how) {
      SimulatedDevice inner(SmallOptions());
      std::unique_ptr<GraphDevice> broken = breakage.wrap(&inner);
      const Subject subject{broken.get(), SmallOptions().capacity, EnqueueOn(&inner)};
      const Findings findings = Check(ClauseNamed(breakage.clause), subject);
      INFO("findings:\n" << findings.ToString());
      CHECK_FALSE(findings.empty());
      // The unbroken device under the same clause finds nothing, so the finding is the break's.
      SimulatedDevice honest(SmallOptions());
      const Subject control{&honest, SmallOptions().capacity, EnqueueOn(&honest)};
      const Findings none = Check(ClauseNamed(breakage.clause), control);
      INFO("findings on the unbroken device:\n" << none.ToString());
      CHECK(none.empty());
    }
  }
}

}  // namespace
}  // namespace tidepool
