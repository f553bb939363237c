// A runtime over the machine's GPUs: one CudaDevice for every device the CUDA driver reports.
//
// Kept apart from runtime.h so that the runtime itself, and everything that takes one (the pools,
// the C API's logic, the tests on simulated devices), builds and links without the CUDA device.
#ifndef TIDEPOOL_RUNTIME_CUDA_RUNTIME_H_
#define TIDEPOOL_RUNTIME_CUDA_RUNTIME_H_

#include <memory>

#include "absl/status/statusor.h"
#include "allocator/config.h"
#include "runtime/runtime.h"

namespace tidepool {

// A runtime owning a CudaDevice for every GPU, in ordinal order. UNAVAILABLE, with the driver's
// reason, on a machine without a usable driver or GPU.
absl::StatusOr<std::unique_ptr<Runtime>> CreateCudaRuntime(const Config& config);

}  // namespace tidepool

#endif  // TIDEPOOL_RUNTIME_CUDA_RUNTIME_H_
