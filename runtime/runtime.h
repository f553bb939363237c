// The runtime: tidepool's registry of devices, one caching allocator and one pool manager each.
//
// A program that serves several GPUs needs, for each device ordinal, the `GraphDevice` that
// drives it, the `CachingAllocator` that caches its memory and the `PoolManager` that routes
// allocations to its pools; and for a bare pointer (a free or a record_stream from a host that
// passes nothing else) it needs to find which device's allocator owns it. The runtime holds
// those and answers that question. The runtime knows nothing of CUDA: it drives whatever
// devices it is given (cuda_runtime.h makes one from every GPU; tests give simulated ones).
//
// The runtime holds each device as a `GraphDevice` (allocator/graph_device.h), not only as the
// narrow `Device` its allocator takes: graph capture through the C API begins, ends and launches
// graphs on the device of an ordinal (graph/capture.h), and the caching core never does.
//
// One runtime per process serves every integration: global_runtime.h holds it, inside
// libtidepool.so, and every integration (the C API, the preload library, PyTorch, CuPy, Numba)
// reaches it through that library's C ABI or is built into the same library. A pointer is then
// freed by the runtime that allocated it, whichever way it came in (docs/design.md, "One runtime
// per process"). C++ programs and tests may make runtimes of their own.
//
// Devices are indexed by ordinal: device i of the runtime has Device::ordinal() == i. An
// ordinal the runtime does not have is an error (INVALID_ARGUMENT when negative, NOT_FOUND
// otherwise) whose message names the ordinals it has.
//
// Finding a pointer's device: every allocator is asked in turn. An allocator answers
// INVALID_ARGUMENT for an address outside its memory (a lock-free page-map lookup) and anything
// else for one inside it, so the first other answer decides; then the external pools of each
// device (pool/external_pool.h: symmetric NCCL pools) are asked the same way, off the fast path;
// if none owns it, the pointer was not allocated by tidepool.
//
// Segment sources that pools take their memory from (user callbacks, ...) can be handed to the
// runtime to keep: a pool's options live as long as its manager (a released pool may be begun
// again), and an allocator returns its segments to their source when it is destroyed, so a
// source must outlive both. The runtime destroys its pool managers, then its allocators, then
// the sources, then the devices it owns.
//
// Thread safety: every method may be called from any thread; the set of devices is fixed at
// creation.
#ifndef TIDEPOOL_RUNTIME_RUNTIME_H_
#define TIDEPOOL_RUNTIME_RUNTIME_H_

#include <memory>
#include <vector>

#include "absl/base/attributes.h"
#include "absl/base/optimization.h"
#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "allocator/mutex.h"
#include "allocator/segment_source.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "trace/recorder.h"

namespace tidepool {

// Where a live block lives: its device and its pool.
struct BlockHome {
  int device = 0;
  PoolId pool;
};

class Runtime {
 public:
  // One allocator and pool manager per device. `devices[i]` must have ordinal i, must not be
  // null, and must outlive the runtime (it is not owned). INVALID_ARGUMENT for an empty list, a
  // null device or an ordinal out of place.
  static absl::StatusOr<std::unique_ptr<Runtime>> Create(std::vector<GraphDevice*> devices,
                                                         const Config& config);
  // The same over devices the runtime owns (destroyed after everything else).
  static absl::StatusOr<std::unique_ptr<Runtime>> Create(
      std::vector<std::unique_ptr<GraphDevice>> devices, const Config& config);

  ~Runtime() = default;
  Runtime(const Runtime&) = delete;
  Runtime& operator=(const Runtime&) = delete;

  int device_count() const { return static_cast<int>(devices_.size()); }
  // The pool manager of a device (its allocator is `allocator()`, its device
  // `allocator()->device()`), or the error for an unknown ordinal.
  absl::StatusOr<PoolManager*> Pools(int device) const;
  // The device of an ordinal, with its streams and graph capture (for graph::Capture), or the
  // error for an unknown ordinal, as for Pools.
  absl::StatusOr<GraphDevice*> GraphDeviceOf(int device) const;

  // The ordinal of the device whose allocator holds the live block at `ptr`. INVALID_ARGUMENT
  // when no allocator of the runtime owns the address; FAILED_PRECONDITION when one does but
  // `ptr` is not a live block (freed already, or inside a block).
  absl::StatusOr<int> DeviceOf(const void* ptr) const;
  // The device and pool of the live block at `ptr`; errors as for DeviceOf.
  absl::StatusOr<BlockHome> HomeOf(const void* ptr) const;
  // Allocates `bytes` on `device` for `stream`, from the pool routing picks (the pool manager's
  // Allocate: see pool/pool_manager.h). Every allocation of the process's runtime comes through
  // here, whichever way it came in, so this is where a trace records it.
  // Inline: the C API's tidepool_malloc is this and little else.
  absl::StatusOr<void*> Allocate(int device, size_t bytes, Stream stream) {
    if (ABSL_PREDICT_TRUE(device >= 0 && device < device_count() && recorder_ == nullptr)) {
      return devices_[device].pools->Allocate(bytes, stream);
    }
    return AllocateSlow(device, bytes, stream);
  }
  // Frees a block of any device (the allocator's Free: see caching_allocator.h); errors as for
  // DeviceOf, and nothing changes on error.
  // Inline, as Allocate: device 0's allocator first, the others only if it does not own `ptr`.
  // Where other owners exist, a pointer device 0 does not hold goes to them at once: the
  // allocator's refusal would spell out a message only to be dropped (a symmetric pool's free).
  absl::Status Free(void* ptr) {
    if (ABSL_PREDICT_FALSE(recorder_ != nullptr)) return FreeRecorded(ptr);
    if (ABSL_PREDICT_FALSE(OthersMayOwn()) && !devices_[0].allocator->Holds(ptr)) {
      return FreeOnOtherDevices(ptr, NotDeviceZeros());
    }
    absl::Status freed = devices_[0].allocator->Free(ptr);
    if (ABSL_PREDICT_TRUE(freed.ok())) return freed;
    return FreeOnOtherDevices(ptr, std::move(freed));
  }
  // Frees a block of any device as ordered on `stream` (CachingAllocator::FreeOnStream; an
  // external pool's block: its RecordStream, then its Free).
  absl::Status FreeOnStream(void* ptr, Stream stream);
  // Marks a live block of any device as used on `stream` (a stream of the block's device).
  absl::Status RecordStream(void* ptr, Stream stream);

  // sglang's three primitives, by device ordinal (the C API's tidepool_begin_allocate_...):
  // route this thread's allocations on `device` to `pool` (creating it, or adding a reference),
  // stop routing (the reference stays), drop a reference. docs/pools.md has the rules.
  absl::Status BeginAllocateCurrentThreadToPool(int device, PoolId pool);
  absl::Status EndAllocateToPool(int device, PoolId pool);
  absl::Status ReleasePool(int device, PoolId pool);

  // Keeps `source` alive until the runtime's allocators are gone, and returns it, for
  // PoolOptions::source.
  SegmentSource* KeepSegmentSource(std::unique_ptr<SegmentSource> source)
      ABSL_LOCKS_EXCLUDED(sources_mu_);

  // Records every later Allocate and Free to `recorder` (trace/recorder.h). Call it before the
  // runtime is shared with other threads (global_runtime.h does, for TIDEPOOL_TRACE).
  void RecordTo(std::unique_ptr<TraceRecorder> recorder) { recorder_ = std::move(recorder); }
  TraceRecorder* recorder() const { return recorder_.get(); }

 private:
  // What one device ordinal has. Members are destroyed in reverse order: the manager, then
  // the allocator it uses.
  struct PerDevice {
    GraphDevice* device = nullptr;
    std::unique_ptr<CachingAllocator> allocator;
    std::unique_ptr<PoolManager> pools;
  };

  Runtime() = default;
  // Allocate and Free off their fast paths: an unknown device, a trace being recorded, a
  // pointer device 0 does not own (`first` is device 0's answer).
  ABSL_ATTRIBUTE_NOINLINE absl::StatusOr<void*> AllocateSlow(int device, size_t bytes,
                                                             Stream stream);
  absl::StatusOr<void*> RecordAllocation(PoolManager& pools, size_t bytes, Stream stream,
                                         absl::StatusOr<void*> block);
  ABSL_ATTRIBUTE_NOINLINE absl::Status FreeRecorded(void* ptr);
  ABSL_ATTRIBUTE_NOINLINE absl::Status FreeOnOtherDevices(void* ptr, absl::Status first);
  // Whether anything besides device 0's allocator may own a pointer: another device, or an
  // external pool (a symmetric NCCL pool) on device 0.
  bool OthersMayOwn() const { return devices_.size() > 1 || devices_[0].pools->has_external(); }
  // Device 0's answer for a pointer it does not hold, as FreeOnOtherDevices reads it: no message
  // (nobody sees it; the runtime's own says what went wrong).
  static absl::Status NotDeviceZeros() { return absl::InvalidArgumentError(""); }
  // The error for a free of a pointer no allocator and no external pool of the runtime owns.
  absl::Status ForeignFree(const void* ptr) const;
  // The error for an ordinal the runtime does not have (see the file comment).
  absl::Status UnknownDevice(int device) const;
  // Builds an allocator and a pool manager for each device (checked as Create says).
  absl::Status AddDevices(const std::vector<GraphDevice*>& devices, const Config& config);

  // Members go in the reverse of the order they are declared in, as the file comment says.
  // Destroyed last: the devices it owns.
  std::vector<std::unique_ptr<GraphDevice>> owned_devices_;
  // Destroyed after the allocators, which return their segments to these.
  Mutex sources_mu_;
  std::vector<std::unique_ptr<SegmentSource>> kept_sources_ ABSL_GUARDED_BY(sources_mu_);
  std::vector<PerDevice> devices_;
  // Destroyed first: nothing records once the runtime is going.
  std::unique_ptr<TraceRecorder> recorder_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_RUNTIME_RUNTIME_H_
