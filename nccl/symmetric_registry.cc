// The symmetric pools of a runtime: see symmetric_registry.h for what a pool's life is and which
// calls are collective.
#include "nccl/symmetric_registry.h"

#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "allocator/cuda_device.h"
#include "nccl/nccl_agreement.h"
#include "nccl/symmetric_segments.h"
#include "pool/external_pool.h"

namespace tidepool {

// A symmetric pool as a pool of its device (pool/external_pool.h): the pool with the agreement
// and segments it works over, which it owns. The pool manager keeps it until the runtime goes,
// so Close (Destroy's work) leaves a shell that refuses allocations.
class SymmetricExternalPool : public ExternalPool {
 public:
  SymmetricExternalPool(std::unique_ptr<RankAgreement> agreement,
                        std::unique_ptr<SymmetricSegments> segments,
                        const SymmetricPool::Options& options)
      : agreement_(std::move(agreement)),
        segments_(std::move(segments)),
        pool_(std::make_unique<SymmetricPool>(segments_.get(), agreement_.get(), options)) {}

  ~SymmetricExternalPool() override {
    // A broken pool's segments cannot be deregistered (that is collective, and the communicator
    // may have been aborted, which frees it): their memory is kept, as Destroy said.
    if (pool_->broken()) {
      (void)pool_.release();
      (void)segments_.release();
      (void)agreement_.release();
    }
  }

  SymmetricPool& pool() { return *pool_; }

  absl::StatusOr<void*> Allocate(size_t bytes, Stream) override {
    if (closed_.load(std::memory_order_acquire)) return Closed("allocation");
    return pool_->Allocate(bytes);
  }
  absl::Status Free(void* ptr) override { return pool_->Free(ptr); }
  absl::StatusOr<size_t> BlockSize(const void* ptr) const override {
    return pool_->LiveBlockSize(ptr);
  }
  absl::Status RecordStream(void* ptr, Stream) override {
    absl::StatusOr<size_t> size = pool_->LiveBlockSize(ptr);
    if (!size.ok()) return size.status();
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: record_stream of %p, a symmetric pool's buffer: its blocks are reused at once "
        "when freed, in stream order, so that every rank places alike (docs/nccl.md rule 8). "
        "Synchronize the other stream before freeing the buffer; nothing was changed",
        ptr));
  }
  absl::Status Trim() override {
    if (closed_.load(std::memory_order_acquire)) return absl::OkStatus();
    return pool_->Trim();
  }
  AllocatorStats Stats() const override {
    const SymmetricPool::Stats pool = pool_->GetStats();
    AllocatorStats stats;
    stats.allocated_bytes.current = pool.live_bytes;
    stats.requested_bytes.current = pool.live_bytes;
    stats.active_blocks.current = pool.live_blocks;
    stats.reserved_bytes.current = pool.reserved_bytes;
    stats.segments.current = pool.segments;
    stats.device_allocations = segments_->registrations();
    stats.device_frees = segments_->deregistrations();
    return stats;
  }
  std::string SnapshotJson() const override { return pool_->SnapshotJson(); }

  // Destroy's work: gives back every segment (collective) and refuses allocations from then on.
  // A broken pool gives nothing back (see the destructor) and is closed all the same.
  absl::Status Close() {
    if (pool_->broken()) {
      closed_.store(true, std::memory_order_release);
      return absl::OkStatus();
    }
    if (absl::Status trimmed = pool_->Trim(); !trimmed.ok()) return trimmed;
    closed_.store(true, std::memory_order_release);
    return absl::OkStatus();
  }

 private:
  absl::Status Closed(const char* what) const {
    return absl::FailedPreconditionError(absl::StrCat(
        "tidepool: ", what, " from a symmetric pool that was destroyed; nothing was changed"));
  }

  std::unique_ptr<RankAgreement> agreement_;
  std::unique_ptr<SymmetricSegments> segments_;
  std::unique_ptr<SymmetricPool> pool_;
  std::atomic<bool> closed_{false};
};

SymmetricRegistry::SymmetricRegistry(Runtime* runtime) : runtime_(runtime) {}

SymmetricRegistry::~SymmetricRegistry() = default;

absl::StatusOr<PoolId> SymmetricRegistry::Create(int device, ncclComm_t comm,
                                                 const SymmetricPool::Options& options) {
  absl::StatusOr<const NcclLibrary*> nccl = NcclLibrary::Get();
  if (!nccl.ok()) return nccl.status();
  absl::StatusOr<GraphDevice*> graph_device = runtime_->GraphDeviceOf(device);
  if (!graph_device.ok()) return graph_device.status();
  auto* cuda_device = dynamic_cast<CudaDevice*>(*graph_device);
  if (cuda_device == nullptr) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: device %d is not a CUDA device (a simulated one?): a symmetric pool over a "
        "real communicator needs one",
        device));
  }
  if (comm == nullptr) {
    return absl::InvalidArgumentError("tidepool: a symmetric pool of a null communicator");
  }
  absl::StatusOr<std::unique_ptr<NcclAgreement>> agreement =
      NcclAgreement::Create(*nccl, comm, cuda_device);
  if (!agreement.ok()) return agreement.status();
  return Create(device, comm, *nccl, *std::move(agreement), options);
}

absl::StatusOr<PoolId> SymmetricRegistry::Create(int device, ncclComm_t comm,
                                                 const NcclLibrary* nccl,
                                                 std::unique_ptr<RankAgreement> agreement,
                                                 const SymmetricPool::Options& options) {
  if (comm == nullptr) {
    return absl::InvalidArgumentError("tidepool: a symmetric pool of a null communicator");
  }
  if (nccl == nullptr || agreement == nullptr) {
    return absl::InvalidArgumentError("tidepool: a symmetric pool needs NCCL and an agreement");
  }
  absl::StatusOr<PoolManager*> pools = runtime_->Pools(device);
  if (!pools.ok()) return pools.status();
  MutexLock lock(&mu_);
  for (const auto& [id, entry] : pools_) {
    if (entry.communicator == comm) {
      return absl::AlreadyExistsError(absl::StrFormat(
          "tidepool: communicator %p has a symmetric pool already (%s on device %d): one pool per "
          "communicator. Nothing was changed",
          static_cast<void*>(comm), id.ToString(), entry.device));
    }
  }
  CachingAllocator* allocator = (*pools)->allocator();
  auto segments = std::make_unique<SymmetricSegments>(
      nccl, comm, [allocator] { return allocator->captures_underway(); });
  auto pool = std::make_shared<SymmetricExternalPool>(std::move(agreement), std::move(segments),
                                                      options);
  const PoolId id = NewUserPoolId();
  if (absl::Status attached = (*pools)->Attach(id, pool); !attached.ok()) return attached;
  pools_[id] = Entry{device, comm, std::move(pool)};
  return id;
}

absl::StatusOr<SymmetricRegistry::Entry> SymmetricRegistry::FindEntry(int device,
                                                                      PoolId id) const {
  MutexLock lock(&mu_);
  auto it = pools_.find(id);
  if (it == pools_.end() || it->second.device != device) {
    return absl::NotFoundError(absl::StrFormat(
        "tidepool: pool %s on device %d is not a symmetric pool (never made by "
        "symmetric-pool create, destroyed since, or another device's)",
        id.ToString(), device));
  }
  return it->second;
}

absl::StatusOr<SymmetricPoolRef> SymmetricRegistry::Find(int device, PoolId id) const {
  absl::StatusOr<Entry> entry = FindEntry(device, id);
  if (!entry.ok()) return entry.status();
  return SymmetricPoolRef{entry->device, id, entry->communicator, &entry->pool->pool()};
}

absl::StatusOr<SymmetricPoolRef> SymmetricRegistry::FindByCommunicator(ncclComm_t comm) const {
  MutexLock lock(&mu_);
  for (const auto& [id, entry] : pools_) {
    if (entry.communicator == comm) {
      return SymmetricPoolRef{entry.device, id, comm, &entry.pool->pool()};
    }
  }
  return absl::NotFoundError(absl::StrFormat(
      "tidepool: communicator %p has no symmetric pool", static_cast<void*>(comm)));
}

absl::StatusOr<SymmetricPool::Location> SymmetricRegistry::Lookup(const void* ptr) const {
  MutexLock lock(&mu_);
  for (const auto& [id, entry] : pools_) {
    absl::StatusOr<SymmetricPool::Location> location = entry.pool->pool().Lookup(ptr);
    if (location.ok()) return location;
  }
  return absl::InvalidArgumentError(absl::StrFormat(
      "tidepool: %p is in no live buffer of a symmetric pool", ptr));
}

absl::Status SymmetricRegistry::Reserve(int device, PoolId id, size_t bytes) {
  absl::StatusOr<Entry> entry = FindEntry(device, id);
  if (!entry.ok()) return entry.status();
  return entry->pool->pool().Reserve(bytes);
}

absl::Status SymmetricRegistry::Trim(int device, PoolId id) {
  absl::StatusOr<Entry> entry = FindEntry(device, id);
  if (!entry.ok()) return entry.status();
  return entry->pool->pool().Trim();
}

absl::Status SymmetricRegistry::Destroy(int device, PoolId id) {
  absl::StatusOr<Entry> entry = FindEntry(device, id);
  if (!entry.ok()) return entry.status();
  absl::StatusOr<PoolManager*> pools = runtime_->Pools(device);
  if (!pools.ok()) return pools.status();
  absl::StatusOr<PoolInfo> info = (*pools)->Info(id);
  if (!info.ok()) return info.status();
  if (info->routes > 0 || info->live_blocks > 0 || info->references > 1) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: destroy of symmetric pool %s on device %d, which still has %d live buffer(s), "
        "%d route(s) and %d begin(s) holding it; free them, end and release first. Nothing was "
        "changed",
        id.ToString(), device, info->live_blocks, info->routes, info->references - 1));
  }
  // A broken pool closes without giving its segments back (see the file comment).
  if (absl::Status closed = entry->pool->Close(); !closed.ok()) return closed;
  if (absl::Status detached = (*pools)->Detach(id); !detached.ok()) return detached;
  MutexLock lock(&mu_);
  pools_.erase(id);
  return absl::OkStatus();
}

}  // namespace tidepool
