// The CUDA driver loaded at run time: see cuda_driver.h for what is resolved, how, and why.
#include "allocator/cuda_driver.h"

#include <dlfcn.h>

#include <cstdlib>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tidepool {
namespace {

// The driver library's soname; the environment variable TIDEPOOL_LIBCUDA names another file.
constexpr char kDefaultLibrary[] = "libcuda.so.1";

// Every driver that has cuGetProcAddress_v2 (CUDA 12.0 and later) answers for this version, and
// the bootstrap entry points (cuInit, cuDriverGetVersion, cuGetErrorName, cuGetErrorString) have
// had one signature since long before it. They are resolved first, with this version, so that an
// old driver is reported as old rather than as a missing symbol.
constexpr int kBootstrapVersion = 12000;

using GetProcAddressFn = decltype(&::cuGetProcAddress);

// Asks the driver for `name` (the base name, e.g. "cuMemAlloc") as of CUDA `version` and stores it
// in `slot`, typed as cuda.h declares the name for the headers' own version.
template <typename Fn>
absl::Status Resolve(GetProcAddressFn get_proc_address, const char* name, int version, Fn* slot) {
  void* address = nullptr;
  CUdriverProcAddressQueryResult found = CU_GET_PROC_ADDRESS_SYMBOL_NOT_FOUND;
  CUresult result =
      get_proc_address(name, &address, version, CU_GET_PROC_ADDRESS_DEFAULT, &found);
  if (result == CUDA_ERROR_STUB_LIBRARY) {
    return absl::UnavailableError(
        "CUDA driver: the library loaded is the CUDA toolkit's stub (lib64/stubs/libcuda.so), "
        "not the NVIDIA driver's libcuda.so.1");
  }
  if (result != CUDA_SUCCESS || found != CU_GET_PROC_ADDRESS_SUCCESS || address == nullptr) {
    return absl::UnavailableError(absl::StrFormat(
        "CUDA driver: cuGetProcAddress(\"%s\", version %d) found nothing (CUresult %d, query "
        "result %d)",
        name, version, static_cast<int>(result), static_cast<int>(found)));
  }
  *slot = reinterpret_cast<Fn>(address);
  return absl::OkStatus();
}

// Resolves the member `entry_point` of `driver` by its base name: `#entry_point` is the name as
// written ("cuMemAlloc"), while `driver->entry_point` goes through cuda.h's macros to the member
// the header declared (cuMemAlloc_v2), so name and type always agree.
#define TIDEPOOL_RESOLVE(entry_point, version)                                             \
  do {                                                                                     \
    absl::Status resolved =                                                                \
        Resolve(get_proc_address, #entry_point, version, &driver->entry_point);            \
    if (!resolved.ok()) return resolved;                                                   \
  } while (false)

std::string VersionString(int version) {
  return absl::StrFormat("%d.%d", version / 1000, (version % 1000) / 10);
}

// Errors that mean the driver or the device cannot be used at all, as opposed to a failed call.
bool IsUnavailable(CUresult result) {
  switch (result) {
    case CUDA_ERROR_NOT_INITIALIZED:
    case CUDA_ERROR_DEINITIALIZED:
    case CUDA_ERROR_STUB_LIBRARY:
    case CUDA_ERROR_DEVICE_UNAVAILABLE:
    case CUDA_ERROR_NO_DEVICE:
    case CUDA_ERROR_DEVICE_NOT_LICENSED:
    case CUDA_ERROR_SYSTEM_NOT_READY:
    case CUDA_ERROR_SYSTEM_DRIVER_MISMATCH:
    case CUDA_ERROR_COMPAT_NOT_SUPPORTED_ON_DEVICE:
      return true;
    default:
      return false;
  }
}

// The entry points needed to report errors, read the driver's version and initialize it.
absl::Status ResolveBootstrap(GetProcAddressFn get_proc_address, CudaDriver* driver) {
  TIDEPOOL_RESOLVE(cuGetErrorName, kBootstrapVersion);
  TIDEPOOL_RESOLVE(cuGetErrorString, kBootstrapVersion);
  TIDEPOOL_RESOLVE(cuDriverGetVersion, kBootstrapVersion);
  TIDEPOOL_RESOLVE(cuInit, kBootstrapVersion);
  return absl::OkStatus();
}

// Every other entry point, asked for as of the headers' own version so that the driver returns
// the variant whose signature cuda.h declares.
absl::Status ResolveRest(GetProcAddressFn get_proc_address, CudaDriver* driver) {
  TIDEPOOL_RESOLVE(cuDeviceGet, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuDeviceGetCount, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuDevicePrimaryCtxRetain, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuDevicePrimaryCtxRelease, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuCtxGetCurrent, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuCtxSetCurrent, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuCtxSynchronize, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemAlloc, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemFree, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemGetInfo, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemcpyHtoD, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemcpyDtoH, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemAddressReserve, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemAddressFree, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemCreate, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemRelease, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemMap, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemUnmap, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemSetAccess, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuMemGetAllocationGranularity, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuEventCreate, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuEventDestroy, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuEventRecord, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuEventQuery, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuEventSynchronize, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuStreamCreate, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuStreamDestroy, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuStreamSynchronize, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuStreamGetId, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuStreamGetCaptureInfo, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuStreamBeginCapture, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuStreamEndCapture, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuThreadExchangeStreamCaptureMode, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuGraphInstantiate, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuGraphLaunch, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuGraphDestroy, CUDA_VERSION);
  TIDEPOOL_RESOLVE(cuGraphExecDestroy, CUDA_VERSION);
  return absl::OkStatus();
}

// The entry points only tests and benchmarks call: each is resolved if the driver has it and
// left null if not (cuda_driver.h says why). A stub library was refused already.
void ResolveForTests(GetProcAddressFn get_proc_address, CudaDriver* driver) {
  Resolve(get_proc_address, "cuDeviceGetName", CUDA_VERSION, &driver->cuDeviceGetName).IgnoreError();
  Resolve(get_proc_address, "cuDeviceTotalMem", CUDA_VERSION, &driver->cuDeviceTotalMem).IgnoreError();
  Resolve(get_proc_address, "cuMemAllocAsync", CUDA_VERSION, &driver->cuMemAllocAsync).IgnoreError();
  Resolve(get_proc_address, "cuMemFreeAsync", CUDA_VERSION, &driver->cuMemFreeAsync).IgnoreError();
  Resolve(get_proc_address, "cuDeviceGetDefaultMemPool", CUDA_VERSION, &driver->cuDeviceGetDefaultMemPool).IgnoreError();
  Resolve(get_proc_address, "cuMemPoolSetAttribute", CUDA_VERSION, &driver->cuMemPoolSetAttribute).IgnoreError();
  Resolve(get_proc_address, "cuStreamWaitEvent", CUDA_VERSION, &driver->cuStreamWaitEvent).IgnoreError();
  Resolve(get_proc_address, "cuMemsetD8Async", CUDA_VERSION, &driver->cuMemsetD8Async).IgnoreError();
  Resolve(get_proc_address, "cuMemsetD32Async", CUDA_VERSION, &driver->cuMemsetD32Async).IgnoreError();
  Resolve(get_proc_address, "cuMemcpyDtoHAsync", CUDA_VERSION, &driver->cuMemcpyDtoHAsync).IgnoreError();
  Resolve(get_proc_address, "cuMemcpyDtoDAsync", CUDA_VERSION, &driver->cuMemcpyDtoDAsync).IgnoreError();
  Resolve(get_proc_address, "cuModuleLoadData", CUDA_VERSION, &driver->cuModuleLoadData).IgnoreError();
  Resolve(get_proc_address, "cuModuleGetFunction", CUDA_VERSION, &driver->cuModuleGetFunction).IgnoreError();
  Resolve(get_proc_address, "cuLaunchKernel", CUDA_VERSION, &driver->cuLaunchKernel).IgnoreError();
}

#undef TIDEPOOL_RESOLVE

}  // namespace

absl::StatusOr<const CudaDriver*> CudaDriver::Get() {
  // Loaded once, thread-safely (a function-local static), and never destroyed: see the header.
  static const auto* const loaded = new absl::StatusOr<const CudaDriver*>(Load());
  return *loaded;
}

absl::StatusOr<const CudaDriver*> CudaDriver::Load() {
  const char* from_environment = std::getenv("TIDEPOOL_LIBCUDA");
  const char* library =
      from_environment != nullptr && from_environment[0] != '\0' ? from_environment
                                                                 : kDefaultLibrary;
  void* handle = dlopen(library, RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    // dlerror's text names the file already.
    return absl::UnavailableError(absl::StrCat(
        "CUDA driver: ", why != nullptr ? why : absl::StrCat("cannot load ", library),
        " (is the NVIDIA driver installed? TIDEPOOL_LIBCUDA names another driver library)"));
  }
  // The library stays open even when a step below fails: cuInit may have started the driver's
  // threads or exit handlers, and Get() caches the failure, so it is never opened twice.
  auto get_proc_address =
      reinterpret_cast<GetProcAddressFn>(dlsym(handle, "cuGetProcAddress_v2"));
  if (get_proc_address == nullptr) {
    return absl::UnavailableError(absl::StrCat(
        "CUDA driver: ", library,
        " has no cuGetProcAddress_v2: the driver is older than CUDA 12.0, and tidepool needs one "
        "for CUDA ",
        VersionString(CUDA_VERSION), " or newer"));
  }

  std::unique_ptr<CudaDriver> driver(new CudaDriver());
  if (absl::Status s = ResolveBootstrap(get_proc_address, driver.get()); !s.ok()) return s;
  if (absl::Status s = driver->Check(driver->cuDriverGetVersion(&driver->driver_version_),
                                     "cuDriverGetVersion");
      !s.ok()) {
    return s;
  }
  // The driver refuses a version newer than itself, and an older variant of an entry point would
  // not match the type cuda.h declares, so an older driver is refused here, in words.
  if (driver->driver_version_ < CUDA_VERSION) {
    return absl::UnavailableError(absl::StrCat(
        "CUDA driver: the installed driver supports CUDA ", VersionString(driver->driver_version_),
        ", but tidepool was built with the CUDA ", VersionString(CUDA_VERSION),
        " headers and needs a driver for CUDA ", VersionString(CUDA_VERSION), " or newer"));
  }
  if (absl::Status s = ResolveRest(get_proc_address, driver.get()); !s.ok()) return s;
  ResolveForTests(get_proc_address, driver.get());
  if (absl::Status s = driver->Check(driver->cuInit(0), "cuInit(0)"); !s.ok()) return s;
  return driver.release();
}

absl::Status CudaDriver::CheckTestEntryPoints() const {
  std::string missing;
  const auto note = [&missing](const void* entry, const char* name) {
    if (entry == nullptr) absl::StrAppend(&missing, missing.empty() ? "" : ", ", name);
  };
  note(reinterpret_cast<const void*>(cuDeviceGetName), "cuDeviceGetName");
  note(reinterpret_cast<const void*>(cuDeviceTotalMem), "cuDeviceTotalMem");
  note(reinterpret_cast<const void*>(cuMemAllocAsync), "cuMemAllocAsync");
  note(reinterpret_cast<const void*>(cuMemFreeAsync), "cuMemFreeAsync");
  note(reinterpret_cast<const void*>(cuDeviceGetDefaultMemPool), "cuDeviceGetDefaultMemPool");
  note(reinterpret_cast<const void*>(cuMemPoolSetAttribute), "cuMemPoolSetAttribute");
  note(reinterpret_cast<const void*>(cuStreamWaitEvent), "cuStreamWaitEvent");
  note(reinterpret_cast<const void*>(cuMemsetD8Async), "cuMemsetD8Async");
  note(reinterpret_cast<const void*>(cuMemsetD32Async), "cuMemsetD32Async");
  note(reinterpret_cast<const void*>(cuMemcpyDtoHAsync), "cuMemcpyDtoHAsync");
  note(reinterpret_cast<const void*>(cuMemcpyDtoDAsync), "cuMemcpyDtoDAsync");
  note(reinterpret_cast<const void*>(cuModuleLoadData), "cuModuleLoadData");
  note(reinterpret_cast<const void*>(cuModuleGetFunction), "cuModuleGetFunction");
  note(reinterpret_cast<const void*>(cuLaunchKernel), "cuLaunchKernel");
  if (missing.empty()) return absl::OkStatus();
  return absl::UnavailableError(absl::StrCat(
      "CUDA driver: this driver lacks entry points tidepool's tests and benchmarks use: ", missing));
}

absl::Status CudaDriver::Check(CUresult result, absl::string_view what) const {
  if (result == CUDA_SUCCESS) return absl::OkStatus();
  const char* name = nullptr;
  const char* description = nullptr;
  // Either lookup may fail (an unknown code, or a driver that failed before they were resolved).
  if (cuGetErrorName == nullptr || cuGetErrorName(result, &name) != CUDA_SUCCESS) name = nullptr;
  if (cuGetErrorString == nullptr || cuGetErrorString(result, &description) != CUDA_SUCCESS) {
    description = nullptr;
  }
  std::string message = absl::StrCat(
      what, ": ",
      name != nullptr ? std::string(name) : absl::StrCat("CUresult ", static_cast<int>(result)));
  if (description != nullptr) absl::StrAppend(&message, " (", description, ")");
  if (result == CUDA_ERROR_OUT_OF_MEMORY) return absl::ResourceExhaustedError(message);
  if (IsUnavailable(result)) return absl::UnavailableError(message);
  return absl::InternalError(message);
}

}  // namespace tidepool
