// The simulated device: see simulated_device.h for what it models and why. This file has the calls
// of the core's Device seam (device.h) and the accounting; streams, the logical clock and graph
// capture (graph_device.h) are in simulated_device_graphs.cc.
#include "allocator/simulated_device.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/size_policy.h"

namespace tidepool {

SimulatedDevice::SimulatedDevice() : SimulatedDevice(Options{}) {}

SimulatedDevice::SimulatedDevice(const Options& options)
    : options_(options), next_address_(options.base_address) {
  MutexLock lock(&mu_);
  // Stream handles differ between devices, so a stream used on the wrong device is unknown there.
  next_stream_handle_ += static_cast<uintptr_t>(options.ordinal) << 24;
  // nullptr is the legacy default stream: it always exists.
  streams_[nullptr] = StreamState{next_stream_id_++};
}

SimulatedDevice::~SimulatedDevice() = default;

absl::Status SimulatedDevice::TakeMemory(size_t bytes) {
  if (fail_all_) {
    return absl::ResourceExhaustedError("simulated device: injected failure (all allocations)");
  }
  if (fail_countdown_ > 0 && --fail_countdown_ == 0) {
    return absl::ResourceExhaustedError("simulated device: injected failure");
  }
  if (bytes > options_.capacity - used_) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "simulated device: out of memory (%d bytes asked, %d of %d used)", bytes, used_,
        options_.capacity));
  }
  used_ += bytes;
  return absl::OkStatus();
}

absl::StatusOr<uintptr_t> SimulatedDevice::TakeAddresses(size_t bytes) {
  const uintptr_t end = options_.base_address + options_.address_space;
  // Fresh addresses first, so a stale pointer stays foreign for as long as possible.
  if (bytes <= end - next_address_) {
    const uintptr_t address = next_address_;
    next_address_ += bytes;
    return address;
  }
  // Then the lowest gap between live segments and ranges, as a driver reuses freed addresses.
  uintptr_t candidate = options_.base_address;
  auto next_segment = segments_.begin();
  auto next_range = ranges_.begin();
  while (true) {
    // The held block that starts first at or after `candidate`, skipping those before it.
    uintptr_t held_start = end;
    size_t held_size = 0;
    if (next_segment != segments_.end() && next_segment->first < held_start) {
      held_start = next_segment->first;
      held_size = RoundUp(next_segment->second, options_.granularity);
    }
    if (next_range != ranges_.end() && next_range->first < held_start) {
      held_start = next_range->first;
      held_size = next_range->second;
    }
    if (held_start >= candidate && held_start - candidate >= bytes) return candidate;
    if (held_start == end) break;
    candidate = std::max(candidate, held_start + held_size);
    if (next_segment != segments_.end() && next_segment->first == held_start) {
      ++next_segment;
    } else {
      ++next_range;
    }
  }
  return absl::ResourceExhaustedError(absl::StrFormat(
      "simulated device %d: no %u bytes of addresses left in its %u-byte address space",
      options_.ordinal, bytes, options_.address_space));
}

absl::StatusOr<uintptr_t> SimulatedDevice::AllocateSegment(size_t bytes) {
  MutexLock lock(&mu_);
  if (bytes == 0) return absl::InvalidArgumentError("simulated device: zero-byte segment");
  if (absl::Status s = TakeMemory(bytes); !s.ok()) return s;
  absl::StatusOr<uintptr_t> address = TakeAddresses(RoundUp(bytes, options_.granularity));
  if (!address.ok()) {
    used_ -= bytes;
    return address.status();
  }
  segments_[*address] = bytes;
  return *address;
}

absl::Status SimulatedDevice::FreeSegment(uintptr_t address, size_t bytes) {
  MutexLock lock(&mu_);
  auto it = segments_.find(address);
  if (it == segments_.end() || it->second != bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("simulated device: no segment of %d bytes at %#x", bytes, address));
  }
  segments_.erase(it);
  used_ -= bytes;
  return absl::OkStatus();
}

absl::StatusOr<uintptr_t> SimulatedDevice::ReserveAddressRange(size_t bytes) {
  MutexLock lock(&mu_);
  if (bytes == 0 || bytes % options_.granularity != 0) {
    return absl::InvalidArgumentError("simulated device: range not a multiple of granularity");
  }
  absl::StatusOr<uintptr_t> address = TakeAddresses(bytes);
  if (!address.ok()) return address.status();
  ranges_[*address] = bytes;
  return *address;
}

absl::Status SimulatedDevice::ReleaseAddressRange(uintptr_t address, size_t bytes) {
  MutexLock lock(&mu_);
  auto it = ranges_.find(address);
  if (it == ranges_.end() || it->second != bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("simulated device: no range of %d bytes at %#x", bytes, address));
  }
  auto mapped = mappings_.lower_bound(address);
  if (mapped != mappings_.end() && mapped->first < address + bytes) {
    return absl::FailedPreconditionError("simulated device: range still has mappings");
  }
  ranges_.erase(it);
  return absl::OkStatus();
}

absl::StatusOr<PhysicalHandle> SimulatedDevice::CreatePhysical(size_t bytes) {
  MutexLock lock(&mu_);
  if (bytes == 0 || bytes % options_.granularity != 0) {
    return absl::InvalidArgumentError("simulated device: chunk not a multiple of granularity");
  }
  if (absl::Status s = TakeMemory(bytes); !s.ok()) return s;
  PhysicalHandle handle = next_physical_++;
  physical_[handle] = bytes;
  return handle;
}

absl::Status SimulatedDevice::ReleasePhysical(PhysicalHandle handle) {
  MutexLock lock(&mu_);
  auto it = physical_.find(handle);
  if (it == physical_.end()) {
    return absl::InvalidArgumentError("simulated device: unknown physical handle");
  }
  for (const auto& [start, mapping] : mappings_) {
    if (mapping.second == handle) {
      return absl::FailedPreconditionError("simulated device: physical chunk still mapped");
    }
  }
  used_ -= it->second;
  physical_.erase(it);
  return absl::OkStatus();
}

absl::Status SimulatedDevice::Map(uintptr_t address, size_t bytes, PhysicalHandle handle) {
  MutexLock lock(&mu_);
  auto chunk = physical_.find(handle);
  if (chunk == physical_.end() || chunk->second != bytes) {
    return absl::InvalidArgumentError("simulated device: map of an unknown or mis-sized chunk");
  }
  auto range = ranges_.upper_bound(address);
  if (range == ranges_.begin() || std::prev(range)->first + std::prev(range)->second <
                                      address + bytes) {
    return absl::InvalidArgumentError("simulated device: map outside any reserved range");
  }
  auto next = mappings_.lower_bound(address);
  if (next != mappings_.end() && next->first < address + bytes) {
    return absl::FailedPreconditionError("simulated device: address already mapped");
  }
  if (next != mappings_.begin()) {
    auto prev = std::prev(next);
    if (prev->first + prev->second.first > address) {
      return absl::FailedPreconditionError("simulated device: address already mapped");
    }
  }
  mappings_[address] = {bytes, handle};
  return absl::OkStatus();
}

absl::Status SimulatedDevice::Unmap(uintptr_t address, size_t bytes) {
  MutexLock lock(&mu_);
  // Every mapping inside [address, address + bytes) must lie wholly inside it.
  auto it = mappings_.lower_bound(address);
  uintptr_t end = address + bytes;
  size_t unmapped = 0;
  while (it != mappings_.end() && it->first < end) {
    if (it->first + it->second.first > end) {
      return absl::InvalidArgumentError("simulated device: unmap splits a mapping");
    }
    unmapped += it->second.first;
    it = mappings_.erase(it);
  }
  if (unmapped != bytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("simulated device: unmap of %d bytes found %d mapped", bytes, unmapped));
  }
  return absl::OkStatus();
}

std::pair<uintptr_t, size_t> SimulatedDevice::MappingAt(uintptr_t address) const {
  MutexLock lock(&mu_);
  auto it = mappings_.upper_bound(address);
  if (it == mappings_.begin()) return {0, 0};
  --it;
  if (address - it->first >= it->second.first) return {0, 0};
  return {it->first, it->second.first};
}

absl::StatusOr<Event> SimulatedDevice::CreateEvent() {
  MutexLock lock(&mu_);
  Event event = reinterpret_cast<Event>(next_event_handle_);
  next_event_handle_ += 0x10;
  events_[event] = EventState{};
  return event;
}

absl::Status SimulatedDevice::DestroyEvent(Event event) {
  MutexLock lock(&mu_);
  if (events_.erase(event) == 0) {
    return absl::InvalidArgumentError("simulated device: unknown event");
  }
  return absl::OkStatus();
}

absl::StatusOr<SimulatedDevice::StreamState*> SimulatedDevice::FindStream(Stream stream) {
  auto it = streams_.find(stream);
  if (it == streams_.end()) {
    // Handles are never reused here, so a destroyed one is recognized (a driver would read freed
    // memory through it).
    if (destroyed_streams_.contains(stream)) ++destroyed_stream_uses_;
    return absl::InvalidArgumentError(
        absl::StrFormat("simulated device: unknown stream %p", stream));
  }
  return &it->second;
}

absl::Status SimulatedDevice::RecordEvent(Event event, Stream stream) {
  MutexLock lock(&mu_);
  auto it = events_.find(event);
  if (it == events_.end()) return absl::InvalidArgumentError("simulated device: unknown event");
  absl::StatusOr<StreamState*> state = FindStream(stream);
  if (!state.ok()) return state.status();
  it->second = EventState{stream, (*state)->enqueued, true};
  return absl::OkStatus();
}

bool SimulatedDevice::AnyCaptureLocked() const {
  for (const auto& [handle, state] : streams_) {
    if (state.capture_id != 0) return true;
  }
  return false;
}

absl::StatusOr<bool> SimulatedDevice::QueryEvent(Event event) {
  MutexLock lock(&mu_);
  if (AnyCaptureLocked()) {
    ++capture_violations_;
    return absl::FailedPreconditionError("simulated device: event queried during capture");
  }
  auto it = events_.find(event);
  if (it == events_.end()) return absl::InvalidArgumentError("simulated device: unknown event");
  if (!it->second.recorded) return true;
  auto stream = streams_.find(it->second.stream);
  // A destroyed stream's work is treated as finished.
  return stream == streams_.end() || stream->second.completed >= it->second.position;
}

absl::Status SimulatedDevice::SynchronizeEvent(Event event) {
  MutexLock lock(&mu_);
  if (AnyCaptureLocked()) {
    ++capture_violations_;
    return absl::FailedPreconditionError("simulated device: event synchronized during capture");
  }
  auto it = events_.find(event);
  if (it == events_.end()) return absl::InvalidArgumentError("simulated device: unknown event");
  ++synchronizations_;
  if (!it->second.recorded) return absl::OkStatus();
  auto stream = streams_.find(it->second.stream);
  if (stream != streams_.end()) {
    stream->second.completed = std::max(stream->second.completed, it->second.position);
  }
  return absl::OkStatus();
}

absl::Status SimulatedDevice::SynchronizeDevice() {
  MutexLock lock(&mu_);
  if (AnyCaptureLocked()) {
    ++capture_violations_;
    return absl::FailedPreconditionError("simulated device: device synchronized during capture");
  }
  ++synchronizations_;
  for (auto& [handle, state] : streams_) state.completed = state.enqueued;
  return absl::OkStatus();
}

absl::StatusOr<StreamId> SimulatedDevice::GetStreamId(Stream stream) {
  MutexLock lock(&mu_);
  absl::StatusOr<StreamState*> state = FindStream(stream);
  if (!state.ok()) return state.status();
  // As the H200's driver does (cuStreamGetId: CUDA_ERROR_STREAM_CAPTURE_UNSUPPORTED).
  if ((*state)->capture_id != 0) {
    ++capture_violations_;
    return absl::FailedPreconditionError(
        "simulated device: stream id asked of a capturing stream");
  }
  return (*state)->id;
}

absl::StatusOr<CaptureInfo> SimulatedDevice::GetCaptureInfo(Stream stream) {
  MutexLock lock(&mu_);
  absl::StatusOr<StreamState*> state = FindStream(stream);
  if (!state.ok()) return state.status();
  CaptureInfo info;
  // As on CUDA: an invalidated capture no longer captures anything.
  if ((*state)->capture_id != 0 && !(*state)->capture_invalidated) {
    info.capturing = true;
    info.capture_id = (*state)->capture_id;
  }
  info.invalidated = (*state)->capture_id != 0 && (*state)->capture_invalidated;
  return info;
}

absl::StatusOr<MemoryInfo> SimulatedDevice::GetMemoryInfo() {
  MutexLock lock(&mu_);
  return MemoryInfo{options_.capacity - used_, options_.capacity};
}

void SimulatedDevice::FailNthAllocation(int64_t n) {
  MutexLock lock(&mu_);
  fail_countdown_ = n;
}

void SimulatedDevice::SetFailAllAllocations(bool fail) {
  MutexLock lock(&mu_);
  fail_all_ = fail;
}

size_t SimulatedDevice::used_bytes() const {
  MutexLock lock(&mu_);
  return used_;
}

int64_t SimulatedDevice::live_segments() const {
  MutexLock lock(&mu_);
  return static_cast<int64_t>(segments_.size() + physical_.size() + ranges_.size());
}

int64_t SimulatedDevice::live_events() const {
  MutexLock lock(&mu_);
  return static_cast<int64_t>(events_.size());
}

int64_t SimulatedDevice::synchronizations() const {
  MutexLock lock(&mu_);
  return synchronizations_;
}

}  // namespace tidepool
