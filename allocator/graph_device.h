// The device with streams and graph capture: `Device` (device.h) plus the calls that make and
// destroy streams, synchronize one stream, and capture, instantiate, launch and destroy graphs.
//
// The caching core takes a `Device` and never makes a call declared here: it only names streams
// the program made and asks whether they capture; it never creates or destroys a stream, never
// waits on one, and never begins a capture or touches a graph. So these calls sit on a second
// interface, and the core's seam stays narrow enough that a fake is easy to keep honest. What
// takes a `GraphDevice` is what needs streams or graphs: graph/ (a capture begins and ends on the
// device, and its graph is launched there), runtime/ (it hands graph/ the device of an ordinal),
// the C API, the replay tool, the benchmarks and tests.
//
// Both implementations of the seam are `GraphDevice`s: `CudaDevice` (cuda_device.h) and
// `SimulatedDevice` (simulated_device.h); `ForwardingDevice` (forwarding_device.h) forwards one.
// tests/testing/device_contract.h checks both against one contract.
//
// Thread safety: as for `Device`, every method may be called from any thread at any time.
#ifndef TIDEPOOL_ALLOCATOR_GRAPH_DEVICE_H_
#define TIDEPOOL_ALLOCATOR_GRAPH_DEVICE_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/device.h"

namespace tidepool {

// A captured graph (CUgraph on CUDA) and its executable form (CUgraphExec).
using GraphHandle = void*;
using GraphExecHandle = void*;

// Which other API calls a capture forbids while it runs (CUstreamCaptureMode): kGlobal forbids
// unsafe calls (those that may synchronize) on every thread, kThreadLocal on the capturing
// thread only, kRelaxed nowhere. The allocator's own device calls are safe under all three.
enum class CaptureMode { kGlobal, kThreadLocal, kRelaxed };

class GraphDevice : public Device {
 public:
  // --- Streams ---------------------------------------------------------------------------------
  // A new non-blocking stream, and its destruction. A destroyed stream's handle may name a new
  // stream later; its id (Device::GetStreamId) is never given to another stream.
  virtual absl::StatusOr<Stream> CreateStream() = 0;
  virtual absl::Status DestroyStream(Stream stream) = 0;
  // Blocks until all work submitted to `stream` so far has completed.
  virtual absl::Status SynchronizeStream(Stream stream) = 0;

  // --- Graph capture ---------------------------------------------------------------------------
  // BeginCapture starts capturing `stream` and returns the capture's id (what GetCaptureInfo
  // reports for it and for every stream that joins it). EndCapture ends the capture `stream`
  // began and returns the graph; when the capture was invalidated it returns the driver's error
  // instead, and the stream has stopped capturing either way.
  virtual absl::StatusOr<uint64_t> BeginCapture(Stream stream, CaptureMode mode) = 0;
  virtual absl::StatusOr<GraphHandle> EndCapture(Stream stream) = 0;
  virtual absl::StatusOr<GraphExecHandle> InstantiateGraph(GraphHandle graph) = 0;
  virtual absl::Status LaunchGraph(GraphExecHandle exec, Stream stream) = 0;
  virtual absl::Status DestroyGraph(GraphHandle graph) = 0;
  virtual absl::Status DestroyGraphExec(GraphExecHandle exec) = 0;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_GRAPH_DEVICE_H_
