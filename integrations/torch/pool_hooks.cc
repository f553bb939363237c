// PyTorch's pool hooks: see pool_hooks.h for how a capture is told apart and how long its mark
// lasts.
#include "integrations/torch/pool_hooks.h"

#include <algorithm>
#include <string>

#include "absl/strings/str_format.h"
#include "pool/pool_manager.h"
#include "pool/route.h"

namespace tidepool {
namespace torch_hooks {

absl::StatusOr<Stream> PoolHooks::ProbeStream(int device) {
  auto found = probes_.find(device);
  if (found != probes_.end()) return found->second;
  absl::StatusOr<GraphDevice*> graph_device = runtime_->GraphDeviceOf(device);
  if (!graph_device.ok()) return graph_device.status();
  absl::StatusOr<Stream> stream = (*graph_device)->CreateStream();
  if (!stream.ok()) return stream.status();
  probes_[device] = *stream;
  return *stream;
}

bool PoolHooks::StillCapturing(GraphDevice& device, CaptureStreams& capture) {
  MutexLock lock(&capture.mu);
  for (Stream stream : capture.streams) {
    absl::StatusOr<CaptureInfo> info = device.GetCaptureInfo(stream);
    if (info.ok() && info->capturing) return true;
  }
  return false;
}

absl::Status PoolHooks::Unmark(int device) {
  absl::StatusOr<PoolManager*> pools = runtime_->Pools(device);
  if (!pools.ok()) return pools.status();
  return (*pools)->allocator()->NoteCaptureEnd();
}

absl::Status PoolHooks::Begin(int device, PoolId pool, Filter filter) {
  if (!filter) return absl::InvalidArgumentError("tidepool: begin with an empty filter");
  MutexLock lock(&mu_);
  absl::StatusOr<PoolManager*> pools = runtime_->Pools(device);
  if (!pools.ok()) return pools.status();
  absl::StatusOr<Stream> probe = ProbeStream(device);
  if (!probe.ok()) return probe.status();
  PoolState& state = pools_[Key{device, pool}];
  Entry entry;
  std::shared_ptr<const RouteFilter::Callable> callable;
  PoolOptions options;
  if (!filter(*probe)) {
    // A capture's filter: it refused a stream that nothing captures.
    entry.marked = true;
    entry.capture = std::make_shared<CaptureStreams>();
    options.shares_free_memory = false;  // a graph replays into its pool's memory
    callable = std::make_shared<const RouteFilter::Callable>(
        [filter = std::move(filter), capture = entry.capture](Stream stream) {
          if (!filter(stream)) return false;
          MutexLock streams(&capture->mu);
          if (std::find(capture->streams.begin(), capture->streams.end(), stream) ==
              capture->streams.end()) {
            capture->streams.push_back(stream);
          }
          return true;
        });
    (*pools)->allocator()->NoteCaptureBegin();
  } else {
    if (!state.orphans.empty()) {
      // A scope resuming the capture's routing it ended (sglang): this entry carries the mark.
      entry.marked = true;
      entry.resumed = true;
      entry.capture = state.orphans.back();
      state.orphans.pop_back();
    }
    callable = std::make_shared<const RouteFilter::Callable>(std::move(filter));
  }
  absl::Status begun = (*pools)->Begin(pool, RouteFilter::Accepting(std::move(callable)), options);
  if (!begun.ok()) {
    if (entry.resumed) {
      state.orphans.push_back(entry.capture);
    } else if (entry.marked) {
      Unmark(device).IgnoreError();
    }
    return begun;
  }
  state.entries.push_back(std::move(entry));
  return absl::OkStatus();
}

absl::Status PoolHooks::End(int device, PoolId pool) {
  MutexLock lock(&mu_);
  absl::StatusOr<PoolManager*> pools = runtime_->Pools(device);
  if (!pools.ok()) return pools.status();
  absl::StatusOr<GraphDevice*> graph_device = runtime_->GraphDeviceOf(device);
  if (!graph_device.ok()) return graph_device.status();
  if (absl::Status ended = (*pools)->End(pool); !ended.ok()) return ended;
  auto found = pools_.find(Key{device, pool});
  if (found == pools_.end() || found->second.entries.empty()) {
    return absl::OkStatus();  // an entry begun elsewhere (the C API): nothing of ours to undo
  }
  PoolState& state = found->second;
  Entry entry = std::move(state.entries.back());
  state.entries.pop_back();
  if (!entry.marked) return absl::OkStatus();
  if (StillCapturing(**graph_device, *entry.capture)) {
    state.orphans.push_back(std::move(entry.capture));
    return absl::OkStatus();
  }
  absl::Status unmarked = Unmark(device);
  // The capture is over and this entry resumed its routing: the reference the resuming begin
  // took would otherwise outlive the graph (PyTorch leaks it).
  if (entry.resumed && balanced_) {
    absl::Status released = (*pools)->Release(pool);
    if (unmarked.ok()) unmarked = released;
  }
  return unmarked;
}

absl::Status PoolHooks::Release(int device, PoolId pool) {
  MutexLock lock(&mu_);
  absl::StatusOr<PoolManager*> pools = runtime_->Pools(device);
  if (!pools.ok()) return pools.status();
  if (absl::Status released = (*pools)->Release(pool); !released.ok()) return released;
  auto found = pools_.find(Key{device, pool});
  if (found == pools_.end() || !found->second.entries.empty()) return absl::OkStatus();
  absl::Status unmarked;
  for (size_t i = 0; i < found->second.orphans.size(); ++i) {
    absl::Status s = Unmark(device);
    if (unmarked.ok()) unmarked = s;
  }
  pools_.erase(found);
  return unmarked;
}

void PoolHooks::set_balanced(bool balanced) {
  MutexLock lock(&mu_);
  balanced_ = balanced;
}

int PoolHooks::marks(int device) {
  MutexLock lock(&mu_);
  int marks = 0;
  for (const auto& [key, state] : pools_) {
    if (key.first != device) continue;
    marks += static_cast<int>(state.orphans.size());
    for (const Entry& entry : state.entries) marks += entry.marked ? 1 : 0;
  }
  return marks;
}

}  // namespace torch_hooks
}  // namespace tidepool
