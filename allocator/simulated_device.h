// A simulated device: host-side, deterministic, and the default for tests and replay.
//
// Segments are address ranges with no backing memory, so a trace that peaked at 100 GiB replays
// on a laptop. Each stream carries a logical clock: `Enqueue` stands for launching work on it,
// events recorded on a stream complete only when the test (or replay) advances that stream's
// clock past them with `Complete` / `CompleteAll`, or when something synchronizes. Capture can be
// begun and ended on a stream; while any capture runs, querying or synchronizing an event is a
// violation (counted, and answered with an error), because a real driver would invalidate the
// capture, and so is asking a capturing stream for its id (the H200's driver refuses it). Faults
// can be injected: the Nth device allocation from now fails.
//
// It implements the whole GraphDevice (graph_device.h): the core's narrow Device calls in
// simulated_device.cc, and the streams and graph capture that only graph/, tools and tests use in
// simulated_device_graphs.cc, so each half of the seam can be read (and kept honest against the
// contract in tests/testing/device_contract.h) on its own.
//
// Thread safe: one internal mutex.
#ifndef TIDEPOOL_ALLOCATOR_SIMULATED_DEVICE_H_
#define TIDEPOOL_ALLOCATOR_SIMULATED_DEVICE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "allocator/mutex.h"

namespace tidepool {

class SimulatedDevice : public GraphDevice {
 public:
  struct Options {
    int ordinal = 0;
    size_t capacity = size_t{80} << 30;  // bytes of "physical" memory
    size_t granularity = size_t{2} << 20;
    // Addresses handed out lie in [base_address, base_address + address_space): fresh ones
    // first, so a stale pointer stays foreign for as long as possible; once the space has been
    // walked through, freed addresses are reused, lowest first. Running out of addresses is
    // RESOURCE_EXHAUSTED. Devices given disjoint spaces never hand out the same address.
    uintptr_t base_address = uintptr_t{0x7f0000000000};
    size_t address_space = size_t{1} << 46;
  };

  SimulatedDevice();
  explicit SimulatedDevice(const Options& options);
  ~SimulatedDevice() override;

  // --- Device ---
  int ordinal() const override { return options_.ordinal; }
  absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) override;
  absl::Status FreeSegment(uintptr_t address, size_t bytes) override;
  size_t granularity() const override { return options_.granularity; }
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

  // --- GraphDevice (simulated_device_graphs.cc) ---
  absl::StatusOr<Stream> CreateStream() override;
  absl::Status DestroyStream(Stream stream) override;
  absl::Status SynchronizeStream(Stream stream) override;
  // A capture on the default stream (nullptr) or on a stream already capturing is refused, as
  // CUDA refuses it. The mode is recorded only.
  absl::StatusOr<uint64_t> BeginCapture(Stream stream,
                                        CaptureMode mode = CaptureMode::kGlobal) override;
  // Ends the capture `stream` began, for every stream joined to it.
  absl::StatusOr<GraphHandle> EndCapture(Stream stream) override;
  absl::StatusOr<GraphExecHandle> InstantiateGraph(GraphHandle graph) override;
  // Launching a graph is one unit of work on `stream` (see Enqueue).
  absl::Status LaunchGraph(GraphExecHandle exec, Stream stream) override;
  absl::Status DestroyGraph(GraphHandle graph) override;
  absl::Status DestroyGraphExec(GraphExecHandle exec) override;

  // --- The logical clock (simulated_device_graphs.cc) ---
  // Launches one unit of work on `stream`; returns its position on the stream's clock.
  uint64_t Enqueue(Stream stream);
  // Completes all work on `stream` up to and including `position` (default: everything).
  void Complete(Stream stream, uint64_t position = UINT64_MAX);
  void CompleteAll();
  // True when all work on the stream enqueued up to `position` has completed.
  bool IsComplete(Stream stream, uint64_t position);

  // --- Capture (simulated_device_graphs.cc) ---
  // Joins `stream` to the capture running on `capturing` (as waiting on its event would).
  void JoinCapture(Stream stream, Stream capturing);
  // Invalidates the capture `stream` takes part in, as an illegal call during capture does on a
  // real device: its streams stop reporting it, and EndCapture fails.
  void InvalidateCapture(Stream stream);
  // Event queries or synchronizations attempted while a capture was running.
  int64_t capture_violations() const;
  // Graphs and executable graphs made and not yet destroyed.
  int64_t live_graphs() const;
  // Calls that named a stream after it was destroyed: a violation (the CUDA driver reads freed
  // memory through such a handle, seen crashing on the H200).
  int64_t destroyed_stream_uses() const;

  // --- Faults ---
  // The `n`th device allocation (segment or physical chunk) from now fails (n = 1: the next).
  void FailNthAllocation(int64_t n);
  // Every device allocation fails while set.
  void SetFailAllAllocations(bool fail);

  // --- Accounting, for tests ---
  size_t used_bytes() const;            // segments + physical chunks held
  // The mapping that covers `address`, as {start, bytes} (one physical allocation mapped at
  // once), or {0, 0} where nothing is mapped.
  std::pair<uintptr_t, size_t> MappingAt(uintptr_t address) const;
  int64_t live_segments() const;        // segments + physical chunks + address ranges held
  int64_t live_events() const;
  int64_t synchronizations() const;     // stream and event synchronizations so far

 private:
  struct StreamState {
    StreamId id = 0;
    uint64_t enqueued = 0;
    uint64_t completed = 0;
    uint64_t capture_id = 0;  // 0 = not capturing
    bool capture_invalidated = false;
    bool capture_origin = false;  // the stream BeginCapture was called on
  };
  struct EventState {
    Stream stream = nullptr;
    uint64_t position = 0;
    bool recorded = false;
  };

  absl::Status TakeMemory(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // `bytes` (a multiple of the granularity) of addresses: see Options::address_space.
  absl::StatusOr<uintptr_t> TakeAddresses(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<StreamState*> FindStream(Stream stream) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  bool AnyCaptureLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const Options options_;
  mutable Mutex mu_;
  uintptr_t next_address_ ABSL_GUARDED_BY(mu_);
  size_t used_ ABSL_GUARDED_BY(mu_) = 0;
  // Live segments and address ranges: start -> size.
  std::map<uintptr_t, size_t> segments_ ABSL_GUARDED_BY(mu_);
  std::map<uintptr_t, size_t> ranges_ ABSL_GUARDED_BY(mu_);
  // Mapped regions inside ranges: start -> (size, handle).
  std::map<uintptr_t, std::pair<size_t, PhysicalHandle>> mappings_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<PhysicalHandle, size_t> physical_ ABSL_GUARDED_BY(mu_);
  PhysicalHandle next_physical_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<Stream, StreamState> streams_ ABSL_GUARDED_BY(mu_);
  uintptr_t next_stream_handle_ ABSL_GUARDED_BY(mu_) = 0x1000;
  StreamId next_stream_id_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<Event, EventState> events_ ABSL_GUARDED_BY(mu_);
  uintptr_t next_event_handle_ ABSL_GUARDED_BY(mu_) = 0x10;
  uint64_t next_capture_id_ ABSL_GUARDED_BY(mu_) = 1;
  int64_t capture_violations_ ABSL_GUARDED_BY(mu_) = 0;
  absl::flat_hash_set<Stream> destroyed_streams_ ABSL_GUARDED_BY(mu_);
  int64_t destroyed_stream_uses_ ABSL_GUARDED_BY(mu_) = 0;
  // Graphs and executable graphs: handle -> the capture id they came from.
  absl::flat_hash_map<GraphHandle, uint64_t> graphs_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<GraphExecHandle, uint64_t> graph_execs_ ABSL_GUARDED_BY(mu_);
  uintptr_t next_graph_handle_ ABSL_GUARDED_BY(mu_) = 0x100;
  int64_t fail_countdown_ ABSL_GUARDED_BY(mu_) = 0;
  bool fail_all_ ABSL_GUARDED_BY(mu_) = false;
  int64_t synchronizations_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_SIMULATED_DEVICE_H_
