// The PyTorch entry points (tidepool_torch.h) over the process's runtime. Each is a thin
// translation, as the C API is: PyTorch's arguments to tidepool's, one call, and a failure
// thrown back into PyTorch (torch_errors.h). The pool hooks' state lives in pool_hooks.h.
#include "integrations/torch/tidepool_torch.h"

#include <cstdio>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/caching_allocator.h"
#include "integrations/c_api/c_status.h"
#include "integrations/torch/pool_hooks.h"
#include "integrations/torch/torch_errors.h"
#include "nccl/global_symmetric_registry.h"
#include "nccl/symmetric_registry.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "runtime/global_runtime.h"
#include "runtime/runtime.h"

namespace tidepool {
namespace torch_hooks {
namespace {

PoolId ToPoolId(std::pair<unsigned long long, unsigned long long> pool) {
  return PoolId{pool.first, pool.second};
}

// The process's runtime, or the error thrown into PyTorch.
Runtime& TheRuntime() {
  if (Runtime* runtime = GlobalRuntimeIfMade()) return *runtime;
  absl::StatusOr<Runtime*> runtime = GlobalRuntime();
  if (!runtime.ok()) ThrowError(std::string(runtime.status().message()));
  return **runtime;
}

PoolHooks& ThePoolHooks() {
  static PoolHooks* const hooks = new PoolHooks(&TheRuntime());
  return *hooks;
}

// Throws a failed status into PyTorch: RESOURCE_EXHAUSTED as torch.OutOfMemoryError.
void ThrowIfFailed(const absl::Status& status, const char* hook) {
  if (status.ok()) return;
  const std::string message = absl::StrCat(hook, ": ", status.message());
  if (absl::IsResourceExhausted(status)) ThrowOutOfMemory(message);
  ThrowError(message);
}

// The symmetric pool each device's mode-B segments come from.
Mutex segment_pools_mu;
absl::flat_hash_map<int, SymmetricPool*>& SegmentPools()
    ABSL_EXCLUSIVE_LOCKS_REQUIRED(segment_pools_mu) {
  static auto* pools = new absl::flat_hash_map<int, SymmetricPool*>();
  return *pools;
}

// The device's bound pool, or nullptr.
SymmetricPool* FindSegmentPool(int device) {
  MutexLock lock(&segment_pools_mu);
  auto found = SegmentPools().find(device);
  return found == SegmentPools().end() ? nullptr : found->second;
}

void ReportFailedFree(const char* hook, void* ptr, const absl::Status& status) {
  std::fprintf(stderr, "tidepool: %s(%p) failed, and the block stays where it was: %s\n", hook,
               ptr, std::string(status.message()).c_str());
}

}  // namespace
}  // namespace torch_hooks
}  // namespace tidepool

using tidepool::PoolId;
using tidepool::Runtime;
using tidepool::torch_hooks::ThePoolHooks;
using tidepool::torch_hooks::TheRuntime;
using tidepool::torch_hooks::ThrowIfFailed;
using tidepool::torch_hooks::ToPoolId;

extern "C" {

void* tidepool_torch_malloc(size_t size, int device, CUstream_st* stream) {
  if (size == 0) return nullptr;  // as PyTorch's own allocator: no block for no bytes
  absl::StatusOr<void*> block = TheRuntime().Allocate(device, size, stream);
  if (!block.ok()) ThrowIfFailed(block.status(), "tidepool_torch_malloc");
  return *block;
}

void tidepool_torch_free(void* ptr, size_t, int, CUstream_st*) {
  if (ptr == nullptr) return;
  Runtime* runtime = tidepool::GlobalRuntimeIfMade();
  if (runtime == nullptr) return;  // nothing was ever allocated
  if (absl::Status freed = runtime->Free(ptr); !freed.ok()) {
    tidepool::torch_hooks::ReportFailedFree("tidepool_torch_free", ptr, freed);
  }
}

void tidepool_torch_init(int) { TheRuntime(); }

void tidepool_torch_empty_cache() {
  Runtime& runtime = TheRuntime();
  for (int device = 0; device < runtime.device_count(); ++device) {
    absl::StatusOr<tidepool::PoolManager*> pools = runtime.Pools(device);
    if (!pools.ok()) ThrowIfFailed(pools.status(), "tidepool_torch_empty_cache");
    absl::Status emptied = (*pools)->allocator()->EmptyCache();
    // During a capture nothing may go back (allocator/caching_allocator.h); PyTorch's own
    // empty_cache then gives back what it can, which is nothing either: not an error.
    if (absl::IsFailedPrecondition(emptied)) continue;
    ThrowIfFailed(emptied, "tidepool_torch_empty_cache");
  }
}

void tidepool_torch_set_memory_fraction(double fraction, int device) {
  if (!(fraction >= 0.0 && fraction <= 1.0)) {
    tidepool::torch_hooks::ThrowError(absl::StrFormat(
        "tidepool_torch_set_memory_fraction: fraction %g is not between 0 and 1", fraction));
  }
  Runtime& runtime = TheRuntime();
  absl::StatusOr<tidepool::PoolManager*> pools = runtime.Pools(device);
  if (!pools.ok()) ThrowIfFailed(pools.status(), "tidepool_torch_set_memory_fraction");
  absl::StatusOr<tidepool::GraphDevice*> graph_device = runtime.GraphDeviceOf(device);
  if (!graph_device.ok()) ThrowIfFailed(graph_device.status(), "tidepool_torch_set_memory_fraction");
  absl::StatusOr<tidepool::MemoryInfo> info = (*graph_device)->GetMemoryInfo();
  if (!info.ok()) ThrowIfFailed(info.status(), "tidepool_torch_set_memory_fraction");
  (*pools)->allocator()->SetMemoryLimit(
      static_cast<size_t>(fraction * static_cast<double>(info->total_bytes)));
}

void* tidepool_torch_base_alloc(void* ptr, size_t* size) {
  Runtime& runtime = TheRuntime();
  absl::StatusOr<int> device = runtime.DeviceOf(ptr);
  if (!device.ok()) ThrowIfFailed(device.status(), "tidepool_torch_base_alloc");
  absl::StatusOr<tidepool::PoolManager*> pools = runtime.Pools(*device);
  if (!pools.ok()) ThrowIfFailed(pools.status(), "tidepool_torch_base_alloc");
  absl::StatusOr<tidepool::CachingAllocator::SegmentRange> range =
      (*pools)->allocator()->SegmentOf(ptr);
  if (!range.ok()) ThrowIfFailed(range.status(), "tidepool_torch_base_alloc");
  if (range->expandable) {
    tidepool::torch_hooks::ThrowError(absl::StrFormat(
        "tidepool_torch_base_alloc: %p lies in an expandable segment, whose memory cannot be "
        "shared between processes by its base address (as with PyTorch's "
        "expandable_segments:True); turn expandable segments off in TIDEPOOL_CONF to share it",
        ptr));
  }
  if (size != nullptr) *size = range->size;
  return reinterpret_cast<void*>(range->base);
}

void tidepool_torch_record_stream(void* ptr, CUstream_st* stream) {
  ThrowIfFailed(TheRuntime().RecordStream(ptr, stream), "tidepool_torch_record_stream");
}

void tidepool_torch_begin_allocate_to_pool(int device,
                                           std::pair<unsigned long long, unsigned long long> pool,
                                           std::function<bool(CUstream_st*)> filter) {
  tidepool::torch_hooks::PoolHooks::Filter accepts;
  if (filter) {
    accepts = [filter = std::move(filter)](tidepool::Stream stream) {
      return filter(static_cast<CUstream_st*>(stream));
    };
  }
  ThrowIfFailed(ThePoolHooks().Begin(device, ToPoolId(pool), std::move(accepts)),
                "tidepool_torch_begin_allocate_to_pool");
}

void tidepool_torch_end_allocate_to_pool(int device,
                                         std::pair<unsigned long long, unsigned long long> pool) {
  ThrowIfFailed(ThePoolHooks().End(device, ToPoolId(pool)), "tidepool_torch_end_allocate_to_pool");
}

void tidepool_torch_release_pool(int device,
                                 std::pair<unsigned long long, unsigned long long> pool) {
  ThrowIfFailed(ThePoolHooks().Release(device, ToPoolId(pool)), "tidepool_torch_release_pool");
}

void* tidepool_torch_symmetric_segment_malloc(size_t size, int device, CUstream_st*) {
  if (size == 0) return nullptr;
  tidepool::SymmetricPool* pool = tidepool::torch_hooks::FindSegmentPool(device);
  if (pool == nullptr) {
    tidepool::torch_hooks::ThrowError(absl::StrFormat(
        "tidepool_torch_symmetric_segment_malloc: no symmetric pool is bound to device %d "
        "(tidepool.torch.nccl_mem_pool binds one)",
        device));
  }
  absl::StatusOr<void*> segment = pool->Allocate(size);
  if (!segment.ok()) ThrowIfFailed(segment.status(), "tidepool_torch_symmetric_segment_malloc");
  return *segment;
}

void tidepool_torch_symmetric_segment_free(void* ptr, size_t, int device, CUstream_st*) {
  if (ptr == nullptr) return;
  tidepool::SymmetricPool* pool = tidepool::torch_hooks::FindSegmentPool(device);
  absl::Status freed = pool != nullptr
                           ? pool->Free(ptr)
                           : absl::FailedPreconditionError("no symmetric pool is bound to the device");
  if (!freed.ok()) {
    tidepool::torch_hooks::ReportFailedFree("tidepool_torch_symmetric_segment_free", ptr, freed);
  }
}

}  // extern "C"

// --- For the Python module ---------------------------------------------------------------------

using tidepool::c_api::Guarded;
using tidepool::c_api::NullArgument;

extern "C" {

tidepool_status tidepool_torch_bind_segment_pool(int device, tidepool_pool_id pool) {
  return Guarded("tidepool_torch_bind_segment_pool", [&]() -> absl::Status {
    absl::StatusOr<tidepool::SymmetricRegistry*> registry = tidepool::GlobalSymmetricRegistry();
    if (!registry.ok()) return registry.status();
    absl::StatusOr<tidepool::SymmetricPoolRef> found =
        (*registry)->Find(device, PoolId{pool.first, pool.second});
    if (!found.ok()) return found.status();
    tidepool::MutexLock lock(&tidepool::torch_hooks::segment_pools_mu);
    tidepool::torch_hooks::SegmentPools()[device] = found->pool;
    return absl::OkStatus();
  });
}

int tidepool_torch_cxx11_abi(void) { return _GLIBCXX_USE_CXX11_ABI; }

int tidepool_torch_out_of_memory_error(void) {
  return tidepool::torch_hooks::TorchOutOfMemoryErrorAvailable() ? 1 : 0;
}

tidepool_status tidepool_torch_set_capture_behaviour(int balanced) {
  return Guarded("tidepool_torch_set_capture_behaviour", [&]() -> absl::Status {
    if (balanced != 0 && balanced != 1) {
      return absl::InvalidArgumentError(
          absl::StrFormat("balanced is %d; it must be 1 (balanced) or 0 (PyTorch's)", balanced));
    }
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    ThePoolHooks().set_balanced(balanced == 1);
    return absl::OkStatus();
  });
}

tidepool_status tidepool_torch_pool_info(int device, tidepool_pool_id pool, int64_t* references,
                                         int64_t* routes) {
  return Guarded("tidepool_torch_pool_info", [&]() -> absl::Status {
    if (references == nullptr) return NullArgument("references");
    if (routes == nullptr) return NullArgument("routes");
    absl::StatusOr<Runtime*> runtime = tidepool::GlobalRuntime();
    if (!runtime.ok()) return runtime.status();
    absl::StatusOr<tidepool::PoolManager*> pools = (*runtime)->Pools(device);
    if (!pools.ok()) return pools.status();
    absl::StatusOr<tidepool::PoolInfo> info = (*pools)->Info(PoolId{pool.first, pool.second});
    if (!info.ok()) return info.status();
    *references = info->references;
    *routes = info->routes;
    return absl::OkStatus();
  });
}

}  // extern "C"
