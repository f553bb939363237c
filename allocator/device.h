// The device seam: every piece of device work the caching core does goes through this interface,
// and it holds only what the core uses.
//
// The caching core never calls CUDA directly. It asks a `Device` to reserve and return segments,
// to map and unmap physical chunks inside a reserved address range (expandable segments), to
// create / record / query / synchronize events, to synchronize the whole device, to tell whether
// a stream is capturing, to name a stream by its unique id, and to report memory info. That is
// all: the core never creates, synchronizes or destroys a stream, and never begins a capture or
// touches a graph. Those calls live on `GraphDevice` (graph_device.h), a `Device` with streams and
// graph capture added, for graph/, runtime/, tools and tests. The seam is kept this narrow so
// that a fake (the simulated device, a test's decorator) has few calls to get right, and so that
// what the core can do to a device is visible here at a glance.
//
// Two implementations exist, both of `GraphDevice`:
//
//   * `CudaDevice` (cuda_device.h): the CUDA driver API, resolved at run time from libcuda.so.1.
//   * `SimulatedDevice` (simulated_device.h): host-side and deterministic, for tests and replay.
//
// tests/testing/device_contract.h checks both against one contract.
//
// Streams are passed as opaque handles (`Stream`, a CUstream on the CUDA device) and identified
// by `StreamId`, the device's unique id for the stream. Handles are reused after a stream is
// destroyed; ids are not. The caching core keys everything by id.
//
// Thread safety: every method may be called from any thread at any time. Implementations do
// their own locking.
#ifndef TIDEPOOL_ALLOCATOR_DEVICE_H_
#define TIDEPOOL_ALLOCATOR_DEVICE_H_

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tidepool {

// An opaque stream handle (CUstream on CUDA). nullptr is the legacy default stream.
using Stream = void*;
// A device's unique, never-reused id for a stream.
using StreamId = uint64_t;
// An opaque event handle (CUevent on CUDA).
using Event = void*;
// An opaque handle to one physical chunk of memory (CUmemGenericAllocationHandle on CUDA).
using PhysicalHandle = uint64_t;

struct CaptureInfo {
  bool capturing = false;
  // Unique id of the capture sequence; streams joined to the same capture share it.
  uint64_t capture_id = 0;
  // The stream is still in a capture that the driver has invalidated (not `capturing`, but not
  // usable as an ordinary stream either until the capture is ended).
  bool invalidated = false;
};

struct MemoryInfo {
  size_t free_bytes = 0;
  size_t total_bytes = 0;
};

class Device {
 public:
  virtual ~Device() = default;

  // The device ordinal this object drives.
  virtual int ordinal() const = 0;

  // --- Plain segments -------------------------------------------------------------------------
  // Returns `bytes` of device memory, or RESOURCE_EXHAUSTED when the device has none left.
  virtual absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) = 0;
  // Returns a segment from AllocateSegment. The caller guarantees no pending work uses it.
  virtual absl::Status FreeSegment(uintptr_t address, size_t bytes) = 0;

  // --- Virtual memory (expandable segments) -----------------------------------------------------
  // The size every physical chunk and every mapping must be a multiple of.
  virtual size_t granularity() const = 0;
  // Reserves `bytes` of address space (a multiple of granularity()), aligned to granularity().
  virtual absl::StatusOr<uintptr_t> ReserveAddressRange(size_t bytes) = 0;
  virtual absl::Status ReleaseAddressRange(uintptr_t address, size_t bytes) = 0;
  // Creates one physical chunk of `bytes` (a multiple of granularity()); RESOURCE_EXHAUSTED when
  // the device is full.
  virtual absl::StatusOr<PhysicalHandle> CreatePhysical(size_t bytes) = 0;
  virtual absl::Status ReleasePhysical(PhysicalHandle handle) = 0;
  // Maps a physical chunk at `address` (inside a reserved range) with read/write access.
  virtual absl::Status Map(uintptr_t address, size_t bytes, PhysicalHandle handle) = 0;
  // Unmaps [address, address + bytes). The caller guarantees no pending work uses it.
  virtual absl::Status Unmap(uintptr_t address, size_t bytes) = 0;

  // --- Events --------------------------------------------------------------------------------
  virtual absl::StatusOr<Event> CreateEvent() = 0;
  virtual absl::Status DestroyEvent(Event event) = 0;
  virtual absl::Status RecordEvent(Event event, Stream stream) = 0;
  // True once all work recorded before the event has completed. Never blocks.
  virtual absl::StatusOr<bool> QueryEvent(Event event) = 0;
  virtual absl::Status SynchronizeEvent(Event event) = 0;
  // Blocks until all work on the device has completed (for memory last used on a stream that
  // has since been destroyed, whose handle can no longer be synchronized).
  virtual absl::Status SynchronizeDevice() = 0;

  // --- Streams, as the core sees them: their identity and whether they capture -----------------
  // The stream's id. The driver refuses it for a stream that is capturing, and the refusal
  // invalidates the capture: while captures may be running, use CaptureSafeStreamId instead.
  virtual absl::StatusOr<StreamId> GetStreamId(Stream stream) = 0;
  virtual absl::StatusOr<CaptureInfo> GetCaptureInfo(Stream stream) = 0;

  // --- Memory info -----------------------------------------------------------------------------
  virtual absl::StatusOr<MemoryInfo> GetMemoryInfo() = 0;
};

// A stream's id that is safe to ask for while captures run. A stream that is not capturing has
// its device id; one that is capturing (or in an invalidated capture) is named by its handle with
// the top bit set, which no device id has: its handle cannot be destroyed, and so cannot name
// another stream, until its capture ends. So during a capture a capturing stream has one id, and
// a different one outside captures; callers key caches by it, never routes (pool/route.h). Costs
// one capture query more than GetStreamId: callers use it only while a capture is underway.
inline constexpr StreamId kCapturingStreamIdBit = StreamId{1} << 63;
inline absl::StatusOr<StreamId> CaptureSafeStreamId(Device& device, Stream stream) {
  absl::StatusOr<CaptureInfo> capture = device.GetCaptureInfo(stream);
  if (!capture.ok()) return capture.status();
  if (!capture->capturing && !capture->invalidated) return device.GetStreamId(stream);
  return kCapturingStreamIdBit | static_cast<StreamId>(reinterpret_cast<uintptr_t>(stream));
}

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_DEVICE_H_
