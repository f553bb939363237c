// The per-device registry: see runtime.h for what it holds, how a pointer's device is found, and
// the order things are destroyed in.
#include "runtime/runtime.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tidepool {
namespace {

// "its device" or "any of its 3 devices", for messages about a pointer no device owns.
std::string AnyDevice(int device_count) {
  return device_count == 1 ? "its device" : absl::StrFormat("any of its %d devices", device_count);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Create(std::vector<GraphDevice*> devices,
                                                         const Config& config) {
  std::unique_ptr<Runtime> runtime(new Runtime());
  if (absl::Status s = runtime->AddDevices(devices, config); !s.ok()) return s;
  return runtime;
}

absl::StatusOr<std::unique_ptr<Runtime>> Runtime::Create(
    std::vector<std::unique_ptr<GraphDevice>> devices, const Config& config) {
  std::unique_ptr<Runtime> runtime(new Runtime());
  std::vector<GraphDevice*> ordered;
  for (const std::unique_ptr<GraphDevice>& device : devices) ordered.push_back(device.get());
  runtime->owned_devices_ = std::move(devices);
  if (absl::Status s = runtime->AddDevices(ordered, config); !s.ok()) return s;
  return runtime;
}

absl::Status Runtime::AddDevices(const std::vector<GraphDevice*>& devices,
                                 const Config& config) {
  if (devices.empty()) {
    return absl::InvalidArgumentError("tidepool: a runtime needs at least one device");
  }
  for (size_t i = 0; i < devices.size(); ++i) {
    if (devices[i] == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tidepool: device %d of the runtime is null", i));
    }
    if (devices[i]->ordinal() != static_cast<int>(i)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tidepool: the runtime's device %d has ordinal %d; devices must be listed in ordinal "
          "order from 0",
          i, devices[i]->ordinal()));
    }
  }
  devices_.reserve(devices.size());
  for (GraphDevice* device : devices) {
    absl::StatusOr<std::unique_ptr<CachingAllocator>> allocator =
        CachingAllocator::Create(device, config);
    if (!allocator.ok()) return allocator.status();
    PerDevice per_device;
    per_device.device = device;
    per_device.allocator = *std::move(allocator);
    per_device.pools = std::make_unique<PoolManager>(per_device.allocator.get());
    devices_.push_back(std::move(per_device));
  }
  return absl::OkStatus();
}

absl::StatusOr<PoolManager*> Runtime::Pools(int device) const {
  if (device >= 0 && device < device_count()) return devices_[device].pools.get();
  return UnknownDevice(device);
}

absl::StatusOr<GraphDevice*> Runtime::GraphDeviceOf(int device) const {
  if (device >= 0 && device < device_count()) return devices_[device].device;
  return UnknownDevice(device);
}

absl::Status Runtime::UnknownDevice(int device) const {
  std::string known = device_count() == 1
                          ? "it has device 0 only"
                          : absl::StrFormat("it has devices 0 to %d", device_count() - 1);
  std::string message =
      absl::StrFormat("tidepool: device %d is not a device tidepool knows: %s", device, known);
  if (device < 0) return absl::InvalidArgumentError(message);
  return absl::NotFoundError(message);
}

absl::StatusOr<int> Runtime::DeviceOf(const void* ptr) const {
  for (int device = 0; device < device_count(); ++device) {
    absl::StatusOr<size_t> size = devices_[device].allocator->BlockSize(ptr);
    if (size.ok()) return device;
    if (!absl::IsInvalidArgument(size.status())) return size.status();
  }
  for (int device = 0; device < device_count(); ++device) {
    absl::StatusOr<ExternalPool*> external = devices_[device].pools->ExternalOwnerOf(ptr);
    if (!external.ok()) continue;
    absl::StatusOr<size_t> size = (*external)->BlockSize(ptr);
    if (!size.ok()) return size.status();
    return device;
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "tidepool: %p was not allocated by tidepool (on %s), or its memory has gone back to the "
      "device since it was freed",
      ptr, AnyDevice(device_count())));
}

absl::StatusOr<BlockHome> Runtime::HomeOf(const void* ptr) const {
  absl::StatusOr<int> device = DeviceOf(ptr);
  if (!device.ok()) return device.status();
  absl::StatusOr<PoolId> pool = devices_[*device].pools->PoolOf(ptr);
  if (!pool.ok()) return pool.status();
  return BlockHome{*device, *pool};
}

absl::StatusOr<void*> Runtime::AllocateSlow(int device, size_t bytes, Stream stream) {
  absl::StatusOr<PoolManager*> pools = Pools(device);
  if (!pools.ok()) return pools.status();
  absl::StatusOr<void*> block = (*pools)->Allocate(bytes, stream);
  if (recorder_ == nullptr) return block;
  return RecordAllocation(**pools, bytes, stream, std::move(block));
}

absl::StatusOr<void*> Runtime::RecordAllocation(PoolManager& pools, size_t bytes, Stream stream,
                                                absl::StatusOr<void*> block) {
  absl::StatusOr<StreamId> stream_id = pools.allocator()->StreamIdOf(stream);
  const StreamId id = stream_id.ok() ? *stream_id : 0;
  if (!block.ok()) {
    recorder_->RecordAllocateFailure(bytes, id);
    return block;
  }
  absl::Status recorded = stream_id.status();
  if (recorded.ok()) recorded = recorder_->RecordAllocate(*block, bytes, id);
  if (recorded.ok()) return block;
  pools.allocator()->Free(*block).IgnoreError();
  return absl::Status(recorded.code(),
                      absl::StrCat("tidepool: the allocation could not be recorded to the trace (",
                                   recorder_->path(), "), so it was not made: ",
                                   recorded.message()));
}

absl::Status Runtime::FreeRecorded(void* ptr) {
  // The row first: once the block is back, another thread may be handed it (recorder.h).
  absl::Status recorded = recorder_->RecordFree(ptr);
  absl::Status freed = devices_[0].allocator->Free(ptr);
  if (!freed.ok()) freed = FreeOnOtherDevices(ptr, std::move(freed));
  return freed.ok() ? recorded : freed;
}

absl::Status Runtime::FreeOnOtherDevices(void* ptr, absl::Status first) {
  // Free directly rather than DeviceOf first: on the usual one-device path that is one page-map
  // lookup instead of two, and an address outside an allocator's memory changes nothing there.
  if (!absl::IsInvalidArgument(first)) return first;
  for (size_t device = 1; device < devices_.size(); ++device) {
    if (!devices_[device].allocator->Holds(ptr)) continue;
    absl::Status freed = devices_[device].allocator->Free(ptr);
    if (!absl::IsInvalidArgument(freed)) return freed;
  }
  // Last, the external pools (a symmetric NCCL pool's blocks): no arena holds their memory.
  for (const PerDevice& per_device : devices_) {
    absl::StatusOr<ExternalPool*> external = per_device.pools->ExternalOwnerOf(ptr);
    if (external.ok()) return (*external)->Free(ptr);
  }
  return ForeignFree(ptr);
}

absl::Status Runtime::ForeignFree(const void* ptr) const {
  return absl::InvalidArgumentError(absl::StrFormat(
      "tidepool: free of %p, which was not allocated by tidepool (on %s), or whose memory has "
      "gone back to the device since it was freed (a double free after empty_cache, a pool's "
      "release or trim, say); nothing was changed",
      ptr, AnyDevice(device_count())));
}

absl::Status Runtime::FreeOnStream(void* ptr, Stream stream) {
  if (ABSL_PREDICT_FALSE(recorder_ != nullptr)) {
    if (absl::Status recorded = RecordStream(ptr, stream); !recorded.ok()) return recorded;
    return FreeRecorded(ptr);
  }
  // A pointer an allocator does not hold is another owner's: no refusal spelled out for it.
  const bool others_may_own = OthersMayOwn();
  for (const PerDevice& per_device : devices_) {
    if (others_may_own && !per_device.allocator->Holds(ptr)) continue;
    absl::Status freed = per_device.allocator->FreeOnStream(ptr, stream);
    if (!absl::IsInvalidArgument(freed)) return freed;
  }
  for (const PerDevice& per_device : devices_) {
    absl::StatusOr<ExternalPool*> external = per_device.pools->ExternalOwnerOf(ptr);
    if (!external.ok()) continue;
    if (absl::Status recorded = (*external)->RecordStream(ptr, stream); !recorded.ok()) {
      return recorded;
    }
    return (*external)->Free(ptr);
  }
  return ForeignFree(ptr);
}

absl::Status Runtime::RecordStream(void* ptr, Stream stream) {
  // DeviceOf first: RecordStream also answers INVALID_ARGUMENT for a stream its device does not
  // know, which must not read as "not this device's pointer".
  absl::StatusOr<int> device = DeviceOf(ptr);
  if (!device.ok()) return device.status();
  absl::StatusOr<ExternalPool*> external = devices_[*device].pools->ExternalOwnerOf(ptr);
  if (external.ok()) return (*external)->RecordStream(ptr, stream);
  return devices_[*device].allocator->RecordStream(ptr, stream);
}

SegmentSource* Runtime::KeepSegmentSource(std::unique_ptr<SegmentSource> source) {
  MutexLock lock(&sources_mu_);
  kept_sources_.push_back(std::move(source));
  return kept_sources_.back().get();
}

absl::Status Runtime::BeginAllocateCurrentThreadToPool(int device, PoolId pool) {
  absl::StatusOr<PoolManager*> pools = Pools(device);
  if (!pools.ok()) return pools.status();
  return (*pools)->Begin(pool, RouteFilter::CurrentThread());
}

absl::Status Runtime::EndAllocateToPool(int device, PoolId pool) {
  absl::StatusOr<PoolManager*> pools = Pools(device);
  if (!pools.ok()) return pools.status();
  return (*pools)->End(pool);
}

absl::Status Runtime::ReleasePool(int device, PoolId pool) {
  absl::StatusOr<PoolManager*> pools = Pools(device);
  if (!pools.ok()) return pools.status();
  return (*pools)->Release(pool);
}

}  // namespace tidepool
