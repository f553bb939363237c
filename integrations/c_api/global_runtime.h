// The process's one tidepool runtime, behind the C API (tidepool.h).
//
// C callers pass a device ordinal and get the allocator and pools of that device, so the C API
// needs one runtime (pool/runtime.h) for the whole process. It is made on first use, from the
// CUDA devices, unless InitSimulated came first; once made it is never replaced and never
// destroyed (at exit, CUDA may already be shutting down, and other threads may still be freeing:
// the memory is left to the process's end). C++ code that shares the process with C callers
// (the C API's own tests, an adapter) reaches the same runtime here.
#ifndef TIDEPOOL_INTEGRATIONS_C_API_GLOBAL_RUNTIME_H_
#define TIDEPOOL_INTEGRATIONS_C_API_GLOBAL_RUNTIME_H_

#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "pool/runtime.h"

namespace tidepool {
namespace c_api {

// The most simulated devices InitSimulated makes (each gets its own range of addresses).
inline constexpr int kMaxSimulatedDevices = 64;

// The runtime, made on the first call from every CUDA device and TIDEPOOL_CONF. Thread safe;
// after the first success, one atomic load. If making it fails, the error is returned and the
// next call tries again.
absl::StatusOr<Runtime*> GlobalRuntime();

// Makes the runtime from `device_count` simulated devices of `bytes_per_device` each, with
// TIDEPOOL_CONF's configuration. FAILED_PRECONDITION if the runtime exists already.
absl::Status InitSimulated(int device_count, size_t bytes_per_device);

}  // namespace c_api
}  // namespace tidepool

#endif  // TIDEPOOL_INTEGRATIONS_C_API_GLOBAL_RUNTIME_H_
