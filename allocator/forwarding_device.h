// A GraphDevice that forwards every call to another GraphDevice: the base for decorators that
// watch or intercept a few calls (tests that check what the allocator gives back and when,
// logging, fault injection on a real device). Override the calls of interest and call the base
// for the rest.
//
// It forwards the whole GraphDevice (graph_device.h), not only the core's narrow Device
// (device.h), so that one decorated object can be handed both to the caching core and to what
// makes streams and captures graphs (graph/, tests): both then see the same device. The
// forwarding of the core's calls and of the streams-and-graphs calls is kept in two blocks, as
// the two interfaces are.
#ifndef TIDEPOOL_ALLOCATOR_FORWARDING_DEVICE_H_
#define TIDEPOOL_ALLOCATOR_FORWARDING_DEVICE_H_

#include "allocator/device.h"
#include "allocator/graph_device.h"

namespace tidepool {

class ForwardingDevice : public GraphDevice {
 public:
  // `inner` must outlive this object.
  explicit ForwardingDevice(GraphDevice* inner) : inner_(inner) {}

  // --- Device ---
  int ordinal() const override { return inner_->ordinal(); }
  absl::StatusOr<uintptr_t> AllocateSegment(size_t bytes) override {
    return inner_->AllocateSegment(bytes);
  }
  absl::Status FreeSegment(uintptr_t address, size_t bytes) override {
    return inner_->FreeSegment(address, bytes);
  }
  size_t granularity() const override { return inner_->granularity(); }
  absl::StatusOr<uintptr_t> ReserveAddressRange(size_t bytes) override {
    return inner_->ReserveAddressRange(bytes);
  }
  absl::Status ReleaseAddressRange(uintptr_t address, size_t bytes) override {
    return inner_->ReleaseAddressRange(address, bytes);
  }
  absl::StatusOr<PhysicalHandle> CreatePhysical(size_t bytes) override {
    return inner_->CreatePhysical(bytes);
  }
  absl::Status ReleasePhysical(PhysicalHandle handle) override {
    return inner_->ReleasePhysical(handle);
  }
  absl::Status Map(uintptr_t address, size_t bytes, PhysicalHandle handle) override {
    return inner_->Map(address, bytes, handle);
  }
  absl::Status Unmap(uintptr_t address, size_t bytes) override {
    return inner_->Unmap(address, bytes);
  }
  absl::StatusOr<Event> CreateEvent() override { return inner_->CreateEvent(); }
  absl::Status DestroyEvent(Event event) override { return inner_->DestroyEvent(event); }
  absl::Status RecordEvent(Event event, Stream stream) override {
    return inner_->RecordEvent(event, stream);
  }
  absl::StatusOr<bool> QueryEvent(Event event) override { return inner_->QueryEvent(event); }
  absl::Status SynchronizeEvent(Event event) override { return inner_->SynchronizeEvent(event); }
  absl::Status SynchronizeDevice() override { return inner_->SynchronizeDevice(); }
  absl::StatusOr<StreamId> GetStreamId(Stream stream) override {
    return inner_->GetStreamId(stream);
  }
  absl::StatusOr<CaptureInfo> GetCaptureInfo(Stream stream) override {
    return inner_->GetCaptureInfo(stream);
  }
  absl::StatusOr<MemoryInfo> GetMemoryInfo() override { return inner_->GetMemoryInfo(); }

  // --- GraphDevice ---
  absl::StatusOr<Stream> CreateStream() override { return inner_->CreateStream(); }
  absl::Status DestroyStream(Stream stream) override { return inner_->DestroyStream(stream); }
  absl::Status SynchronizeStream(Stream stream) override {
    return inner_->SynchronizeStream(stream);
  }
  absl::StatusOr<uint64_t> BeginCapture(Stream stream, CaptureMode mode) override {
    return inner_->BeginCapture(stream, mode);
  }
  absl::StatusOr<GraphHandle> EndCapture(Stream stream) override {
    return inner_->EndCapture(stream);
  }
  absl::StatusOr<GraphExecHandle> InstantiateGraph(GraphHandle graph) override {
    return inner_->InstantiateGraph(graph);
  }
  absl::Status LaunchGraph(GraphExecHandle exec, Stream stream) override {
    return inner_->LaunchGraph(exec, stream);
  }
  absl::Status DestroyGraph(GraphHandle graph) override { return inner_->DestroyGraph(graph); }
  absl::Status DestroyGraphExec(GraphExecHandle exec) override {
    return inner_->DestroyGraphExec(exec);
  }

 private:
  GraphDevice* const inner_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_ALLOCATOR_FORWARDING_DEVICE_H_
