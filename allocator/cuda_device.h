// The CUDA implementation of the device seam, on the driver API loaded at run time.
//
// It implements GraphDevice (graph_device.h): the caching core's narrow Device (device.h: memory,
// virtual memory, events, stream identity, capture info, memory info, device synchronization)
// and, for graph/, the runtime, tools and tests, streams and graph capture, which the core never
// uses. tests/gpu/device_contract_test checks it against the same contract as the simulated
// device.
//
// One CudaDevice drives one device ordinal through its primary context, the context the CUDA
// runtime (and so PyTorch, CuPy, ...) uses, so pointers and streams are shared with the program.
// Each method that needs a current context first checks, cheaply, that the primary context is
// current on the calling thread and makes it current if not (nothing is restored: a thread that
// calls tidepool for a device is working on that device).
//
// Mapping of the seam onto the driver:
//   * plain segments: cuMemAlloc / cuMemFree;
//   * expandable segments: cuMemAddressReserve (aligned to the granularity), cuMemCreate (pinned
//     device memory), cuMemMap + cuMemSetAccess (read/write for this device), cuMemUnmap;
//     granularity is the driver's RECOMMENDED granularity for such memory;
//   * events are created without timing (cheaper to record and query); streams non-blocking;
//     synchronizing the device is cuCtxSynchronize on the primary context;
//   * a stream's id is cuStreamGetId, which also names the legacy (nullptr), CU_STREAM_LEGACY and
//     CU_STREAM_PER_THREAD streams; a capture is CU_STREAM_CAPTURE_STATUS_ACTIVE in
//     cuStreamGetCaptureInfo, with the capture sequence's id.
//
// Capture safety: calls that take or return device memory run with the calling thread in relaxed
// stream-capture mode (cuThreadExchangeStreamCaptureMode), then the thread's mode is restored. In
// the default (global) mode a cuMemAlloc on any thread while another thread captures invalidates
// that capture; PyTorch's graph capture hits exactly that with a plain-cudaMalloc allocator.
//
// Out-of-memory from the driver is RESOURCE_EXHAUSTED: the caching core frees its cache and retries
// on that code alone.
//
// Thread safety: no state changes after Create, and the driver is thread safe, so no lock.
#ifndef TIDEPOOL_ALLOCATOR_CUDA_DEVICE_H_
#define TIDEPOOL_ALLOCATOR_CUDA_DEVICE_H_

#include <cuda.h>

#include <memory>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/cuda_driver.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"

namespace tidepool {

class CudaDevice : public GraphDevice {
 public:
  // Loads the driver, retains the primary context of device `ordinal` and reads its granularity.
  // UNAVAILABLE with the driver's reason on a machine without a usable driver or device;
  // INVALID_ARGUMENT for an ordinal the machine does not have.
  static absl::StatusOr<std::unique_ptr<CudaDevice>> Create(int ordinal);
  // Releases the primary context (the program's other users keep it alive).
  ~CudaDevice() override;
  CudaDevice(const CudaDevice&) = delete;
  CudaDevice& operator=(const CudaDevice&) = delete;

  // The loaded driver, for tests and benchmarks that launch their own work.
  const CudaDriver& driver() const { return driver_; }
  // The primary context this device works in.
  CUcontext context() const { return context_; }
  // Makes the primary context current on the calling thread if it is not already.
  absl::Status MakeCurrent() const;

  // --- Device ---
  int ordinal() const override { return ordinal_; }
  absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) override;
  absl::Status FreeSegment(uintptr_t address, size_t bytes) override;
  size_t granularity() const override { return granularity_; }
  absl::StatusOr<uintptr_t> ReserveAddressRange(size_t bytes) override;
  absl::Status ReleaseAddressRange(uintptr_t address, size_t bytes) override;
  absl::StatusOr<PhysicalHandle> CreatePhysical(size_t bytes) override;
  absl::Status ReleasePhysical(PhysicalHandle handle) override;
  absl::Status Map(uintptr_t address, size_t bytes, PhysicalHandle handle) override;
  absl::Status Unmap(uintptr_t address, size_t bytes) override;
  absl::StatusOr<Event> CreateEvent() override;
  absl::Status DestroyEvent(Event event) override;
  absl::Status RecordEvent(Event event, Stream stream) override;
  absl::StatusOr<bool> QueryEvent(Event event) override;
  absl::Status SynchronizeEvent(Event event) override;
  absl::Status SynchronizeDevice() override;
  absl::StatusOr<StreamId> GetStreamId(Stream stream) override;
  absl::StatusOr<CaptureInfo> GetCaptureInfo(Stream stream) override;
  absl::StatusOr<MemoryInfo> GetMemoryInfo() override;

  // --- GraphDevice ---
  absl::StatusOr<Stream> CreateStream() override;
  absl::Status DestroyStream(Stream stream) override;
  absl::Status SynchronizeStream(Stream stream) override;
  absl::StatusOr<uint64_t> BeginCapture(Stream stream, CaptureMode mode) override;
  absl::StatusOr<GraphHandle> EndCapture(Stream stream) override;
  absl::StatusOr<GraphExecHandle> InstantiateGraph(GraphHandle graph) override;
  absl::Status LaunchGraph(GraphExecHandle exec, Stream stream) override;
  absl::Status DestroyGraph(GraphHandle graph) override;
  absl::Status DestroyGraphExec(GraphExecHandle exec) override;

 private:
  CudaDevice(const CudaDriver& driver, int ordinal, CUdevice device, CUcontext context);

  // Runs `call` (a driver call returning CUresult) with the calling thread in relaxed capture
  // mode, then restores the thread's mode; returns the call's result, or the error of switching
  // to relaxed mode (then `call` did not run).
  template <typename Call>
  CUresult RunRelaxed(Call call) const;
  // The stream handles that name a context's default stream rather than a stream object; the
  // driver resolves them through the current context.
  static bool IsDefaultStream(Stream stream);

  const CudaDriver& driver_;
  const int ordinal_;
  const CUdevice device_;
  const CUcontext context_;
  // Read from the driver in Create (which needs the context current first), fixed afterwards.
  size_t granularity_ = 0;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_CUDA_DEVICE_H_
