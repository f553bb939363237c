// Helpers shared by the GPU tests: see gpu_test_util.h.
#include "tests/gpu/gpu_test_util.h"

#include <cstring>
#include <utility>
#include <vector>

namespace tidepool {
namespace gpu_test {
namespace {

// The spin kernel. PTX rather than a cubin so the driver compiles it for whatever GPU runs the
// test; the target is the oldest the CUDA 13 toolkit still knows (checked with its ptxas).
constexpr char kSpinKernelPtx[] = R"ptx(
.version 7.0
.target sm_75
.address_size 64

.visible .entry tidepool_spin_then_store(
    .param .u64 flag_address,
    .param .u64 nanoseconds,
    .param .u32 value)
{
    .reg .pred %waiting;
    .reg .b32 %stored;
    .reg .b64 %flag, %wait, %start, %now, %elapsed;

    ld.param.u64 %flag, [flag_address];
    ld.param.u64 %wait, [nanoseconds];
    ld.param.u32 %stored, [value];
    cvta.to.global.u64 %flag, %flag;
    mov.u64 %start, %globaltimer;
SPIN:
    mov.u64 %now, %globaltimer;
    sub.u64 %elapsed, %now, %start;
    setp.lt.u64 %waiting, %elapsed, %wait;
    @%waiting bra SPIN;
    st.global.u32 [%flag], %stored;
    ret;
}
)ptx";

// REQUIREs that a driver call succeeded, with the driver's name for the error.
void RequireSuccess(const CudaDevice& device, CUresult result, const char* what) {
  TIDEPOOL_REQUIRE_OK(device.driver().Check(result, what));
}

}  // namespace

std::unique_ptr<CudaDevice> RequireDevice() { return RequireDeviceAt(0); }

std::unique_ptr<CudaDevice> RequireDeviceAt(int ordinal) {
  absl::StatusOr<std::unique_ptr<CudaDevice>> device = CudaDevice::Create(ordinal);
  INFO("CudaDevice::Create(" << ordinal << ") -> " << device.status().ToString()
                                   << "\nThese tests need an NVIDIA GPU and its driver "
                                      "(libcuda.so.1, or TIDEPOOL_LIBCUDA naming it).");
  REQUIRE(device.ok());
  const absl::Status test_entry_points = (*device)->driver().CheckTestEntryPoints();
  INFO(test_entry_points.ToString());
  REQUIRE(test_entry_points.ok());
  return *std::move(device);
}

std::unique_ptr<CachingAllocator> RequireAllocator(CudaDevice& device, bool expandable) {
  Config config;
  config.expandable_segments = expandable;
  absl::StatusOr<std::unique_ptr<CachingAllocator>> allocator =
      CachingAllocator::Create(&device, config);
  TIDEPOOL_REQUIRE_OK(allocator);
  return std::move(*allocator);
}

Stream RequireStream(CudaDevice& device) {
  absl::StatusOr<Stream> stream = device.CreateStream();
  TIDEPOOL_REQUIRE_OK(stream);
  return *stream;
}

void FillPattern(CudaDevice& device, uintptr_t address, size_t bytes, uint32_t pattern,
                 Stream stream) {
  REQUIRE(address % 4 == 0);
  const CudaDriver& driver = device.driver();
  const size_t words = bytes / 4;
  const size_t tail = bytes % 4;
  if (words > 0) {
    RequireSuccess(device,
                   driver.cuMemsetD32Async(address, pattern, words, ToCuStream(stream)),
                   "cuMemsetD32Async");
  }
  if (tail > 0) {
    RequireSuccess(device,
                   driver.cuMemsetD8Async(address + words * 4,
                                          static_cast<unsigned char>(pattern & 0xff), tail,
                                          ToCuStream(stream)),
                   "cuMemsetD8Async");
  }
}

size_t CountMismatches(CudaDevice& device, uintptr_t address, size_t bytes, uint32_t pattern,
                       Stream stream) {
  const CudaDriver& driver = device.driver();
  std::vector<uint8_t> host(bytes);
  RequireSuccess(device,
                 driver.cuMemcpyDtoHAsync(host.data(), address, bytes, ToCuStream(stream)),
                 "cuMemcpyDtoHAsync");
  TIDEPOOL_REQUIRE_OK(device.SynchronizeStream(stream));
  size_t mismatches = 0;
  const size_t words = bytes / 4;
  for (size_t i = 0; i < words; ++i) {
    uint32_t word;
    std::memcpy(&word, host.data() + i * 4, sizeof(word));
    if (word != pattern) mismatches += 4;
  }
  for (size_t i = words * 4; i < bytes; ++i) {
    if (host[i] != static_cast<uint8_t>(pattern & 0xff)) ++mismatches;
  }
  return mismatches;
}

size_t RequireFreeBytes(CudaDevice& device) {
  absl::StatusOr<MemoryInfo> info = device.GetMemoryInfo();
  TIDEPOOL_REQUIRE_OK(info);
  return info->free_bytes;
}

SpinKernel::SpinKernel(CudaDevice& device) : device_(device) {
  // Never unloaded: the module lives as long as the primary context, and a test binary loads it
  // only a few times.
  TIDEPOOL_REQUIRE_OK(device_.MakeCurrent());
  const CudaDriver& driver = device_.driver();
  RequireSuccess(device_, driver.cuModuleLoadData(&module_, kSpinKernelPtx),
                 "cuModuleLoadData(spin kernel PTX)");
  RequireSuccess(device_,
                 driver.cuModuleGetFunction(&function_, module_, "tidepool_spin_then_store"),
                 "cuModuleGetFunction(tidepool_spin_then_store)");
}

void SpinKernel::Launch(uintptr_t address, uint64_t nanoseconds, uint32_t value, Stream stream) {
  CUdeviceptr flag_address = address;
  void* arguments[] = {&flag_address, &nanoseconds, &value};
  RequireSuccess(device_,
                 device_.driver().cuLaunchKernel(function_, /*gridDimX=*/1, 1, 1,
                                                 /*blockDimX=*/1, 1, 1, /*sharedMemBytes=*/0,
                                                 ToCuStream(stream), arguments,
                                                 /*extra=*/nullptr),
                 "cuLaunchKernel(spin kernel)");
}

}  // namespace gpu_test
}  // namespace tidepool
