// The device contract (tests/testing/device_contract.h) on CudaDevice: the same clauses that
// tests/allocator/device_contract_test checks on the simulated device, so that what the core is
// tested against on the CPU is what it gets on a GPU.
//
// Work that keeps a stream busy is the spin kernel of gpu_test_util.h (0.3 s), so an event
// recorded after it is certainly pending when the test looks. The capacity clause, which fills
// the whole device, is not run on a GPU (the section warns so); every other clause is. Without a
// usable GPU every section fails, saying why (RequireDevice).
#include <cstdint>
#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/cuda_device.h"
#include "allocator/graph_device.h"
#include "catch2/catch.hpp"
#include "tests/gpu/gpu_test_util.h"
#include "tests/testing/device_contract.h"

namespace tidepool {
namespace gpu_test {
namespace {

using testing::device_contract::RunDeviceContract;
using testing::device_contract::Subject;

// Long enough that the host certainly looks before the GPU finishes.
constexpr uint64_t kSpinNanoseconds = 300'000'000;
constexpr size_t kFlagBytes = 4096;

// GPU 0, and a spin kernel with the word it stores into.
class CudaGpu0 {
 public:
  static constexpr const char* kName = "CudaDevice (GPU 0)";

  CudaGpu0() : device_(RequireDevice()), spin_(*device_) {
    absl::StatusOr<uintptr_t> flag = device_->AllocateSegment(kFlagBytes);
    TIDEPOOL_REQUIRE_OK(flag);
    flag_ = *flag;
  }
  ~CudaGpu0() {
    // The spin kernels (and graph replays of them) write the flag: wait for them first.
    device_->SynchronizeDevice().IgnoreError();
    device_->FreeSegment(flag_, kFlagBytes).IgnoreError();
  }
  CudaGpu0(const CudaGpu0&) = delete;
  CudaGpu0& operator=(const CudaGpu0&) = delete;

  Subject subject() {
    return Subject{device_.get(), /*exhaustible_capacity=*/0, [this](Stream stream) {
                     spin_.Launch(flag_, kSpinNanoseconds, 1, stream);
                     return absl::OkStatus();
                   }};
  }

 private:
  std::unique_ptr<CudaDevice> device_;
  SpinKernel spin_;
  uintptr_t flag_ = 0;
};

TEMPLATE_TEST_CASE("the CUDA device keeps the device contract", "[gpu][device_contract]",
                   CudaGpu0) {
  RunDeviceContract<TestType>();
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
