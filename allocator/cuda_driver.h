// The CUDA driver API, loaded at run time: the only door from tidepool to libcuda.
//
// tidepool never links against libcuda. `CudaDriver::Get()` opens `libcuda.so.1` with dlopen (or
// the file named by the environment variable TIDEPOOL_LIBCUDA), finds `cuGetProcAddress_v2` with
// dlsym, and resolves every other entry point through it, by base name ("cuMemAlloc") and the CUDA
// version of the headers tidepool was built with, exactly as the CUDA runtime does. Three reasons:
//   * a library that uses tidepool loads and runs its CPU paths on a machine with no GPU and no
//     driver (that machine gets an error from Get(), never a loader failure or an abort);
//   * the LD_PRELOAD interposer's own device calls go straight to the driver's entry points and
//     can never come back through its hooks;
//   * the function each member points at is the version cuda.h declares, so every call is
//     type-checked against the header.
//
// Members are plain function pointers named after the API (`driver.cuMemAlloc(&ptr, bytes)`).
// cuda.h maps some names to versioned symbols with macros (cuMemAlloc -> cuMemAlloc_v2); the
// member names go through the same macros, so the declared type always matches what the driver
// returned for that base name.
//
// The driver is loaded once per process and never unloaded: at exit CUDA may already be shutting
// down, and other code may still hold pointers into it.
#ifndef TIDEPOOL_ALLOCATOR_CUDA_DRIVER_H_
#define TIDEPOOL_ALLOCATOR_CUDA_DRIVER_H_

#include <cuda.h>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tidepool {

class CudaDriver {
 public:
  // The process's driver, loaded and initialized (cuInit) on first use; thread safe. UNAVAILABLE
  // when libcuda cannot be loaded (no driver on this machine), when the driver is older than the
  // CUDA headers tidepool was built with, or when cuInit fails (no device); the message says
  // which, and what to do.
  static absl::StatusOr<const CudaDriver*> Get();

  CudaDriver(const CudaDriver&) = delete;
  CudaDriver& operator=(const CudaDriver&) = delete;

  // OK for CUDA_SUCCESS; otherwise an error naming `what` (the call and its arguments) and the
  // driver's error, e.g. "cuMemAlloc(1048576): CUDA_ERROR_OUT_OF_MEMORY (out of memory)".
  // RESOURCE_EXHAUSTED for out-of-memory (the caching core frees its cache and retries on it),
  // UNAVAILABLE when the driver or device is unusable, INTERNAL for anything else.
  absl::Status Check(CUresult result, absl::string_view what) const;

  // UNAVAILABLE, naming them, if any of the entry points for tests and benchmarks (below) is
  // missing from this driver.
  absl::Status CheckTestEntryPoints() const;

  // The driver's version, as cuDriverGetVersion reports it (13000 is CUDA 13.0).
  int driver_version() const { return driver_version_; }

  // --- Entry points (see the file comment for how they are resolved) --------------------------
  // Initialization and devices.
  decltype(&::cuInit) cuInit = nullptr;
  decltype(&::cuDriverGetVersion) cuDriverGetVersion = nullptr;
  decltype(&::cuDeviceGet) cuDeviceGet = nullptr;
  decltype(&::cuDeviceGetCount) cuDeviceGetCount = nullptr;
  // Contexts.
  decltype(&::cuDevicePrimaryCtxRetain) cuDevicePrimaryCtxRetain = nullptr;
  decltype(&::cuDevicePrimaryCtxRelease) cuDevicePrimaryCtxRelease = nullptr;
  decltype(&::cuCtxGetCurrent) cuCtxGetCurrent = nullptr;
  decltype(&::cuCtxSetCurrent) cuCtxSetCurrent = nullptr;
  // Asked for by its base name at CUDA 13.0, the driver returns the CUDA 13 ABI, which cuda.h
  // declares as cuCtxSynchronize_v2 (it takes the context) with no macro mapping the base name;
  // calling it through the old declaration passed a garbage context (seen on the H200:
  // CUDA_ERROR_CONTEXT_IS_DESTROYED).
  decltype(&::cuCtxSynchronize_v2) cuCtxSynchronize = nullptr;
  // Plain and stream-ordered allocation.
  decltype(&::cuMemAlloc) cuMemAlloc = nullptr;
  decltype(&::cuMemFree) cuMemFree = nullptr;
  decltype(&::cuMemGetInfo) cuMemGetInfo = nullptr;
  // Small synchronous copies (the symmetric pool's agreement among ranks, nccl/).
  decltype(&::cuMemcpyHtoD) cuMemcpyHtoD = nullptr;
  decltype(&::cuMemcpyDtoH) cuMemcpyDtoH = nullptr;
  // Virtual memory management (expandable segments).
  decltype(&::cuMemAddressReserve) cuMemAddressReserve = nullptr;
  decltype(&::cuMemAddressFree) cuMemAddressFree = nullptr;
  decltype(&::cuMemCreate) cuMemCreate = nullptr;
  decltype(&::cuMemRelease) cuMemRelease = nullptr;
  decltype(&::cuMemMap) cuMemMap = nullptr;
  decltype(&::cuMemUnmap) cuMemUnmap = nullptr;
  decltype(&::cuMemSetAccess) cuMemSetAccess = nullptr;
  decltype(&::cuMemGetAllocationGranularity) cuMemGetAllocationGranularity = nullptr;
  // Events.
  decltype(&::cuEventCreate) cuEventCreate = nullptr;
  decltype(&::cuEventDestroy) cuEventDestroy = nullptr;
  decltype(&::cuEventRecord) cuEventRecord = nullptr;
  decltype(&::cuEventQuery) cuEventQuery = nullptr;
  decltype(&::cuEventSynchronize) cuEventSynchronize = nullptr;
  // Streams and capture.
  decltype(&::cuStreamCreate) cuStreamCreate = nullptr;
  decltype(&::cuStreamDestroy) cuStreamDestroy = nullptr;
  decltype(&::cuStreamSynchronize) cuStreamSynchronize = nullptr;
  decltype(&::cuStreamGetId) cuStreamGetId = nullptr;
  decltype(&::cuStreamGetCaptureInfo) cuStreamGetCaptureInfo = nullptr;
  decltype(&::cuStreamBeginCapture) cuStreamBeginCapture = nullptr;
  decltype(&::cuStreamEndCapture) cuStreamEndCapture = nullptr;
  decltype(&::cuThreadExchangeStreamCaptureMode) cuThreadExchangeStreamCaptureMode = nullptr;
  // Graphs.
  decltype(&::cuGraphInstantiate) cuGraphInstantiate = nullptr;
  decltype(&::cuGraphLaunch) cuGraphLaunch = nullptr;
  decltype(&::cuGraphDestroy) cuGraphDestroy = nullptr;
  decltype(&::cuGraphExecDestroy) cuGraphExecDestroy = nullptr;
  // Errors.
  decltype(&::cuGetErrorName) cuGetErrorName = nullptr;
  decltype(&::cuGetErrorString) cuGetErrorString = nullptr;

  // --- For tests and benchmarks only ----------------------------------------------------------
  // Resolved after the entry points above, each left null where the driver lacks it: tidepool
  // itself never calls these, so a driver without one must not stop tidepool from loading. Tests
  // and benchmarks call CheckTestEntryPoints first.
  decltype(&::cuDeviceGetName) cuDeviceGetName = nullptr;
  decltype(&::cuDeviceTotalMem) cuDeviceTotalMem = nullptr;
  decltype(&::cuMemAllocAsync) cuMemAllocAsync = nullptr;
  decltype(&::cuMemFreeAsync) cuMemFreeAsync = nullptr;
  decltype(&::cuDeviceGetDefaultMemPool) cuDeviceGetDefaultMemPool = nullptr;
  decltype(&::cuMemPoolSetAttribute) cuMemPoolSetAttribute = nullptr;
  decltype(&::cuStreamWaitEvent) cuStreamWaitEvent = nullptr;
  decltype(&::cuMemsetD8Async) cuMemsetD8Async = nullptr;
  decltype(&::cuMemsetD32Async) cuMemsetD32Async = nullptr;
  decltype(&::cuMemcpyDtoHAsync) cuMemcpyDtoHAsync = nullptr;
  decltype(&::cuMemcpyDtoDAsync) cuMemcpyDtoDAsync = nullptr;
  decltype(&::cuModuleLoadData) cuModuleLoadData = nullptr;
  decltype(&::cuModuleGetFunction) cuModuleGetFunction = nullptr;
  decltype(&::cuLaunchKernel) cuLaunchKernel = nullptr;

 private:
  CudaDriver() = default;
  // Opens the library, resolves every entry point, checks the version and runs cuInit.
  static absl::StatusOr<const CudaDriver*> Load();

  int driver_version_ = 0;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_CUDA_DRIVER_H_
