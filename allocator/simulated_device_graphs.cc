// The simulated device's streams and graph capture (the GraphDevice half of the seam), its
// logical clock and its capture helpers: see simulated_device.h. The caching core never calls
// these; simulated_device.cc has the calls it does make.
#include <algorithm>

#include "allocator/simulated_device.h"

namespace tidepool {

absl::StatusOr<Stream> SimulatedDevice::CreateStream() {
  MutexLock lock(&mu_);
  Stream stream = reinterpret_cast<Stream>(next_stream_handle_);
  next_stream_handle_ += 0x10;
  streams_[stream] = StreamState{next_stream_id_++};
  return stream;
}

absl::Status SimulatedDevice::DestroyStream(Stream stream) {
  MutexLock lock(&mu_);
  if (stream == nullptr || streams_.erase(stream) == 0) {
    return absl::InvalidArgumentError("simulated device: unknown or default stream");
  }
  destroyed_streams_.insert(stream);
  return absl::OkStatus();
}

absl::Status SimulatedDevice::SynchronizeStream(Stream stream) {
  MutexLock lock(&mu_);
  absl::StatusOr<StreamState*> state = FindStream(stream);
  if (!state.ok()) return state.status();
  if ((*state)->capture_id != 0) {
    ++capture_violations_;
    return absl::FailedPreconditionError("simulated device: stream synchronized during capture");
  }
  ++synchronizations_;
  (*state)->completed = (*state)->enqueued;
  return absl::OkStatus();
}

uint64_t SimulatedDevice::Enqueue(Stream stream) {
  MutexLock lock(&mu_);
  return ++streams_.at(stream).enqueued;
}

void SimulatedDevice::Complete(Stream stream, uint64_t position) {
  MutexLock lock(&mu_);
  StreamState& state = streams_.at(stream);
  state.completed = std::max(state.completed, std::min(position, state.enqueued));
}

void SimulatedDevice::CompleteAll() {
  MutexLock lock(&mu_);
  for (auto& [handle, state] : streams_) state.completed = state.enqueued;
}

bool SimulatedDevice::IsComplete(Stream stream, uint64_t position) {
  MutexLock lock(&mu_);
  auto it = streams_.find(stream);
  return it == streams_.end() || it->second.completed >= position;
}

absl::StatusOr<uint64_t> SimulatedDevice::BeginCapture(Stream stream, CaptureMode) {
  MutexLock lock(&mu_);
  if (stream == nullptr) {
    return absl::InvalidArgumentError("simulated device: the default stream cannot be captured");
  }
  absl::StatusOr<StreamState*> state = FindStream(stream);
  if (!state.ok()) return state.status();
  if ((*state)->capture_id != 0) {
    return absl::FailedPreconditionError("simulated device: the stream is capturing already");
  }
  uint64_t id = next_capture_id_++;
  (*state)->capture_id = id;
  (*state)->capture_origin = true;
  (*state)->capture_invalidated = false;
  return id;
}

void SimulatedDevice::JoinCapture(Stream stream, Stream capturing) {
  MutexLock lock(&mu_);
  const StreamState& origin = streams_.at(capturing);
  StreamState& joined = streams_.at(stream);
  joined.capture_id = origin.capture_id;
  joined.capture_invalidated = origin.capture_invalidated;
}

void SimulatedDevice::InvalidateCapture(Stream stream) {
  MutexLock lock(&mu_);
  uint64_t id = streams_.at(stream).capture_id;
  if (id == 0) return;
  for (auto& [handle, state] : streams_) {
    if (state.capture_id == id) state.capture_invalidated = true;
  }
}

absl::StatusOr<GraphHandle> SimulatedDevice::EndCapture(Stream stream) {
  MutexLock lock(&mu_);
  absl::StatusOr<StreamState*> state = FindStream(stream);
  if (!state.ok()) return state.status();
  const uint64_t id = (*state)->capture_id;
  if (id == 0 || !(*state)->capture_origin) {
    return absl::FailedPreconditionError(
        "simulated device: end of capture on a stream that did not begin one");
  }
  const bool invalidated = (*state)->capture_invalidated;
  for (auto& [handle, other] : streams_) {
    if (other.capture_id != id) continue;
    other.capture_id = 0;
    other.capture_origin = false;
    other.capture_invalidated = false;
  }
  if (invalidated) {
    return absl::InternalError("simulated device: the capture was invalidated");
  }
  GraphHandle graph = reinterpret_cast<GraphHandle>(next_graph_handle_);
  next_graph_handle_ += 0x10;
  graphs_[graph] = id;
  return graph;
}

absl::StatusOr<GraphExecHandle> SimulatedDevice::InstantiateGraph(GraphHandle graph) {
  MutexLock lock(&mu_);
  auto it = graphs_.find(graph);
  if (it == graphs_.end()) return absl::InvalidArgumentError("simulated device: unknown graph");
  GraphExecHandle exec = reinterpret_cast<GraphExecHandle>(next_graph_handle_);
  next_graph_handle_ += 0x10;
  graph_execs_[exec] = it->second;
  return exec;
}

absl::Status SimulatedDevice::LaunchGraph(GraphExecHandle exec, Stream stream) {
  MutexLock lock(&mu_);
  if (!graph_execs_.contains(exec)) {
    return absl::InvalidArgumentError("simulated device: unknown executable graph");
  }
  absl::StatusOr<StreamState*> state = FindStream(stream);
  if (!state.ok()) return state.status();
  ++(*state)->enqueued;
  return absl::OkStatus();
}

absl::Status SimulatedDevice::DestroyGraph(GraphHandle graph) {
  MutexLock lock(&mu_);
  if (graphs_.erase(graph) == 0) {
    return absl::InvalidArgumentError("simulated device: unknown graph");
  }
  return absl::OkStatus();
}

absl::Status SimulatedDevice::DestroyGraphExec(GraphExecHandle exec) {
  MutexLock lock(&mu_);
  if (graph_execs_.erase(exec) == 0) {
    return absl::InvalidArgumentError("simulated device: unknown executable graph");
  }
  return absl::OkStatus();
}

int64_t SimulatedDevice::destroyed_stream_uses() const {
  MutexLock lock(&mu_);
  return destroyed_stream_uses_;
}

int64_t SimulatedDevice::live_graphs() const {
  MutexLock lock(&mu_);
  return static_cast<int64_t>(graphs_.size() + graph_execs_.size());
}

int64_t SimulatedDevice::capture_violations() const {
  MutexLock lock(&mu_);
  return capture_violations_;
}

}  // namespace tidepool
