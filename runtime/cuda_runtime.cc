// A runtime over every GPU the driver reports: see cuda_runtime.h.
#include "runtime/cuda_runtime.h"

#include <utility>
#include <vector>

#include "allocator/cuda_device.h"
#include "allocator/cuda_driver.h"

namespace tidepool {

absl::StatusOr<std::unique_ptr<Runtime>> CreateCudaRuntime(const Config& config) {
  absl::StatusOr<const CudaDriver*> driver = CudaDriver::Get();
  if (!driver.ok()) return driver.status();
  int count = 0;
  if (absl::Status s = (*driver)->Check((*driver)->cuDeviceGetCount(&count), "cuDeviceGetCount");
      !s.ok()) {
    return s;
  }
  if (count == 0) {
    return absl::UnavailableError("tidepool: the CUDA driver reports no device");
  }
  std::vector<std::unique_ptr<GraphDevice>> devices;
  for (int ordinal = 0; ordinal < count; ++ordinal) {
    absl::StatusOr<std::unique_ptr<CudaDevice>> device = CudaDevice::Create(ordinal);
    if (!device.ok()) return device.status();
    devices.push_back(*std::move(device));
  }
  return Runtime::Create(std::move(devices), config);
}

}  // namespace tidepool
