// The process's runtime: made once, under a lock, published through an atomic pointer so that
// every later call reads it without the lock. See global_runtime.h.
#include "runtime/global_runtime.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/config.h"
#include "allocator/mutex.h"
#include "allocator/simulated_device.h"
#include "runtime/cuda_runtime.h"
#include "trace/recorder.h"

namespace tidepool {
namespace {

// Where simulated device 0's addresses start, and the distance between two devices' spaces.
// The start is above every host address (x86-64 user space ends at 2^47 with 4-level page
// tables), so host memory that a callback pool hands in never lands inside a simulated range.
// Each device hands out addresses from its own space only (reusing freed ones once it has walked
// through it), so two devices never hand out the same address; 64 devices end below 2^55,
// inside the allocator's 57-bit page map.
constexpr uintptr_t kFirstSimulatedAddress = uintptr_t{1} << 52;
constexpr uintptr_t kSimulatedAddressRange = uintptr_t{1} << 48;

// A device's own space: 64 times its memory (room for many streams' expandable segments, each
// reserving as much as the device has), from 1 TiB up to the distance between devices. Not more:
// the page map keeps host memory for every stretch of addresses ever handed out.
size_t SimulatedAddressSpace(size_t bytes_per_device) {
  const size_t wanted = bytes_per_device <= kSimulatedAddressRange / 64 ? 64 * bytes_per_device
                                                                         : kSimulatedAddressRange;
  return std::max(wanted, size_t{1} << 40);
}
// The largest simulated device: the host keeps tables in proportion to a device's size (its
// expandable segments reserve that much address space), so a size no GPU has is refused rather
// than turned into gigabytes of host memory.
constexpr size_t kMaxSimulatedBytes = size_t{1} << 40;

struct GlobalState {
  Mutex mu;
  std::unique_ptr<Runtime> runtime ABSL_GUARDED_BY(mu);
};

// Never destroyed (global_runtime.h says why).
GlobalState& State() {
  static GlobalState* const state = new GlobalState();
  return *state;
}

// TIDEPOOL_TRACE=path: record every allocate and free of the process to a trace at `path`
// (docs/configuration.md). A trace asked for and not writable stops the start: running without
// it would lose what the user asked to record.
absl::Status StartTracing(Runtime& runtime) {
  const char* path = std::getenv("TIDEPOOL_TRACE");
  if (path == nullptr || *path == '\0') return absl::OkStatus();
  absl::StatusOr<std::unique_ptr<TraceRecorder>> recorder = TraceRecorder::Open(path);
  if (!recorder.ok()) {
    // A bad value of the variable, as a bad TIDEPOOL_CONF is: INVALID_ARGUMENT.
    return absl::InvalidArgumentError(absl::StrCat("tidepool: TIDEPOOL_TRACE=", path,
                                                   " asks for a trace that cannot be written: ",
                                                   recorder.status().message()));
  }
  runtime.RecordTo(*std::move(recorder));
  // The runtime is never destroyed, so nothing else would write out the rows still buffered
  // when the process ends (a program under the interposer never flushes by hand). Registered
  // once: the runtime is made once.
  std::atexit([] {
    Runtime* made = GlobalRuntimeIfMade();
    if (made != nullptr && made->recorder() != nullptr) made->recorder()->Flush().IgnoreError();
  });
  return absl::OkStatus();
}

void Publish(GlobalState& state, std::unique_ptr<Runtime> runtime)
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(state.mu) {
  state.runtime = std::move(runtime);
  global_runtime_internal::published.store(state.runtime.get(), std::memory_order_release);
}

}  // namespace

// runtime.get() once made; read without the lock. Constant-initialized, so it is null before
// any constructor runs.
std::atomic<Runtime*> global_runtime_internal::published{nullptr};

absl::StatusOr<Runtime*> global_runtime_internal::Make() {
  GlobalState& state = State();
  MutexLock lock(&state.mu);
  if (state.runtime != nullptr) return state.runtime.get();
  absl::StatusOr<Config> config = Config::FromEnvironment();
  if (!config.ok()) return config.status();
  absl::StatusOr<std::unique_ptr<Runtime>> runtime = CreateCudaRuntime(*config);
  if (!runtime.ok()) {
    return absl::Status(
        runtime.status().code(),
        absl::StrCat("tidepool could not start on the CUDA devices: ", runtime.status().message(),
                     ". Without a GPU, call tidepool_init_simulated before any other call."));
  }
  if (absl::Status s = StartTracing(**runtime); !s.ok()) return s;
  Publish(state, *std::move(runtime));
  return state.runtime.get();
}

absl::Status InitSimulatedGlobalRuntime(int device_count, size_t bytes_per_device) {
  if (device_count < 1 || device_count > kMaxSimulatedDevices) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tidepool: %d simulated devices asked for; 1 to %d can be made",
                        device_count, kMaxSimulatedDevices));
  }
  if (bytes_per_device == 0 || bytes_per_device > kMaxSimulatedBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "tidepool: simulated devices of %u bytes asked for; 1 byte to %u bytes (1 TiB) can be "
        "made",
        bytes_per_device, kMaxSimulatedBytes));
  }
  GlobalState& state = State();
  MutexLock lock(&state.mu);
  if (state.runtime != nullptr) {
    return absl::FailedPreconditionError(
        "tidepool: the runtime exists already (made by an earlier init, or by the first call "
        "that needed it, from the CUDA devices); tidepool_init_simulated must come first. "
        "Nothing was changed");
  }
  absl::StatusOr<Config> config = Config::FromEnvironment();
  if (!config.ok()) return config.status();
  std::vector<std::unique_ptr<GraphDevice>> devices;
  for (int ordinal = 0; ordinal < device_count; ++ordinal) {
    SimulatedDevice::Options options;
    options.ordinal = ordinal;
    options.capacity = bytes_per_device;
    options.base_address = kFirstSimulatedAddress + ordinal * kSimulatedAddressRange;
    options.address_space = SimulatedAddressSpace(bytes_per_device);
    devices.push_back(std::make_unique<SimulatedDevice>(options));
  }
  absl::StatusOr<std::unique_ptr<Runtime>> runtime = Runtime::Create(std::move(devices), *config);
  if (!runtime.ok()) return runtime.status();
  if (absl::Status s = StartTracing(**runtime); !s.ok()) return s;
  Publish(state, *std::move(runtime));
  return absl::OkStatus();
}

}  // namespace tidepool
