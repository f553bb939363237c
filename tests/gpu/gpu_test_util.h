// Helpers shared by the GPU tests (tests/gpu/): opening the device, making a caching allocator on
// it, filling device memory with a pattern and checking it, and a spin kernel that keeps a stream
// busy for a known time.
//
// A GPU test must never pass or skip quietly on a machine where the GPU cannot be used: every
// helper here REQUIREs success and puts the driver's message in the failure, so a missing driver
// or device shows up as a loud failure with the reason.
#ifndef TIDEPOOL_TESTS_GPU_GPU_TEST_UTIL_H_
#define TIDEPOOL_TESTS_GPU_GPU_TEST_UTIL_H_

#include <cuda.h>

#include <cstddef>
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "allocator/device.h"
#include "catch2/catch.hpp"

namespace tidepool {
namespace gpu_test {

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kGiB = size_t{1} << 30;

// The driver's handle for a stream of the CUDA device.
inline CUstream ToCuStream(Stream stream) { return static_cast<CUstream>(stream); }

// The status of an absl::Status or absl::StatusOr, for TIDEPOOL_REQUIRE_OK.
inline const absl::Status& StatusOf(const absl::Status& status) { return status; }
template <typename T>
const absl::Status& StatusOf(const absl::StatusOr<T>& status_or) {
  return status_or.status();
}

// REQUIREs that a Status or StatusOr is OK, reporting the expression and the status otherwise.
#define TIDEPOOL_REQUIRE_OK(expression)                                               \
  do {                                                                                \
    const ::absl::Status tidepool_checked = ::tidepool::gpu_test::StatusOf(expression); \
    INFO(#expression << " -> " << tidepool_checked.ToString());                        \
    REQUIRE(tidepool_checked.ok());                                                   \
  } while (false)

// Device 0 with its primary context current on the calling thread; the test fails here, with the
// driver's reason, when there is no usable GPU.
std::unique_ptr<CudaDevice> RequireDevice();
// As RequireDevice, for device `ordinal` (the multi-GPU tests: one rank per device).
std::unique_ptr<CudaDevice> RequireDeviceAt(int ordinal);

// A CachingAllocator on `device` with expandable_segments set to `expandable`.
std::unique_ptr<CachingAllocator> RequireAllocator(CudaDevice& device, bool expandable);

// A non-blocking stream of `device`.
Stream RequireStream(CudaDevice& device);

// Queues on `stream` a fill of [address, address + bytes): every whole 32-bit word gets `pattern`,
// the trailing bytes (bytes % 4) get its low byte. `address` must be 4-byte aligned.
void FillPattern(CudaDevice& device, uintptr_t address, size_t bytes, uint32_t pattern,
                 Stream stream);

// Copies [address, address + bytes) back after the work queued on `stream` (synchronizing it) and
// returns how many bytes differ from what FillPattern(…, pattern) writes.
size_t CountMismatches(CudaDevice& device, uintptr_t address, size_t bytes, uint32_t pattern,
                       Stream stream);

// The free bytes of the device as the driver reports them.
size_t RequireFreeBytes(CudaDevice& device);

// One single-thread kernel, loaded from PTX: it spins on the GPU's global timer for a number of
// nanoseconds, then stores a 32-bit value. It keeps a stream busy for a known time without
// depending on the GPU's speed, and the stored value shows that it ran.
class SpinKernel {
 public:
  // Loads the kernel into the device's primary context; the test fails here if it cannot.
  explicit SpinKernel(CudaDevice& device);
  SpinKernel(const SpinKernel&) = delete;
  SpinKernel& operator=(const SpinKernel&) = delete;

  // Queues the kernel on `stream`: spin for `nanoseconds`, then store `value` at `address`.
  void Launch(uintptr_t address, uint64_t nanoseconds, uint32_t value, Stream stream);

 private:
  CudaDevice& device_;
  CUmodule module_ = nullptr;
  CUfunction function_ = nullptr;
};

}  // namespace gpu_test
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_GPU_GPU_TEST_UTIL_H_
