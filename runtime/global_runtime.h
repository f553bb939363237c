// The process's one tidepool runtime, behind the C API (tidepool.h) and every integration.
//
// C callers pass a device ordinal and get the allocator and pools of that device, so the C API
// needs one runtime (runtime.h) for the whole process. It is made on first use, from the CUDA
// devices, unless InitSimulatedGlobalRuntime came first; once made it is never replaced and never
// destroyed (at exit, CUDA may already be shutting down, and other threads may still be freeing:
// the memory is left to the process's end). C++ code that shares the process with C callers
// (the C API's own tests, an adapter) reaches the same runtime here.
//
// There is one in the process only if one copy of this file is: it lives in libtidepool.so,
// which hides everything but the tidepool_* functions, so a second shared library that linked
// it statically would hold a second runtime whose pointers the first cannot free. Integrations
// therefore call libtidepool.so's C ABI, or are built into libtidepool.so itself
// (docs/design.md, "One runtime per process").
#ifndef TIDEPOOL_RUNTIME_GLOBAL_RUNTIME_H_
#define TIDEPOOL_RUNTIME_GLOBAL_RUNTIME_H_

#include <atomic>
#include <cstddef>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "runtime/runtime.h"

namespace tidepool {

// The most simulated devices InitSimulatedGlobalRuntime makes (each gets its own range of
// addresses).
inline constexpr int kMaxSimulatedDevices = 64;

namespace global_runtime_internal {
// The runtime once made (read without a lock), and the slow path that makes it.
extern std::atomic<Runtime*> published;
absl::StatusOr<Runtime*> Make();
}  // namespace global_runtime_internal

// The runtime if it has been made, else nullptr: one atomic load, for the C API's hot path.
inline Runtime* GlobalRuntimeIfMade() {
  return global_runtime_internal::published.load(std::memory_order_acquire);
}

// The runtime, made on the first call from every CUDA device and TIDEPOOL_CONF. Thread safe;
// after the first success, one atomic load. If making it fails, the error is returned and the
// next call tries again.
inline absl::StatusOr<Runtime*> GlobalRuntime() {
  if (Runtime* runtime = GlobalRuntimeIfMade()) return runtime;
  return global_runtime_internal::Make();
}

// Makes the runtime from `device_count` simulated devices of `bytes_per_device` each, with
// TIDEPOOL_CONF's configuration. FAILED_PRECONDITION if the runtime exists already.
absl::Status InitSimulatedGlobalRuntime(int device_count, size_t bytes_per_device);

}  // namespace tidepool

#endif  // TIDEPOOL_RUNTIME_GLOBAL_RUNTIME_H_
