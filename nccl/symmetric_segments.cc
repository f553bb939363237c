// Registered symmetric segments: see symmetric_segments.h for the NCCL rules kept here.
#include "nccl/symmetric_segments.h"

#include <algorithm>
#include <memory>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_format.h"

namespace tidepool {

Mutex& CommunicatorLock(ncclComm_t comm) {
  // Never destroyed: a communicator may be used until the process ends.
  static Mutex* const registry_mu = new Mutex();
  static auto* const locks = new absl::flat_hash_map<ncclComm_t, std::unique_ptr<Mutex>>();
  MutexLock lock(registry_mu);
  std::unique_ptr<Mutex>& slot = (*locks)[comm];
  if (slot == nullptr) slot = std::make_unique<Mutex>();
  return *slot;
}

SymmetricSegments::SymmetricSegments(const NcclLibrary* nccl, ncclComm_t comm,
                                     std::function<int()> captures_underway)
    : nccl_(nccl), comm_(comm), captures_underway_(std::move(captures_underway)) {}

SymmetricSegments::~SymmetricSegments() {
  for (const SymmetricSegment& segment : segments()) Destroy(segment).IgnoreError();
}

absl::Status SymmetricSegments::RefuseDuringCapture(const char* what) const {
  const int captures = captures_underway_ ? captures_underway_() : 0;
  if (captures == 0) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrFormat(
      "tidepool: %s of a symmetric segment while %d CUDA graph capture(s) are underway on the "
      "device: registering a window may synchronize, which would break the capture. Reserve "
      "the symmetric pool before capturing; nothing was changed",
      what, captures));
}

absl::StatusOr<SymmetricSegment> SymmetricSegments::Create(size_t bytes) {
  absl::StatusOr<void*> memory = AllocateMemory(bytes);
  if (!memory.ok()) return memory.status();
  return Register(*memory, bytes);
}

absl::StatusOr<void*> SymmetricSegments::AllocateMemory(size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("tidepool: a symmetric segment of 0 bytes");
  if (absl::Status s = RefuseDuringCapture("creation"); !s.ok()) return s;
  void* memory = nullptr;
  if (absl::Status s = nccl_->Check(nccl_->ncclMemAlloc(&memory, bytes),
                                    absl::StrFormat("ncclMemAlloc(%u)", bytes));
      !s.ok()) {
    // ncclMemAlloc fails with a CUDA error when the device is full.
    return absl::ResourceExhaustedError(s.message());
  }
  return memory;
}

void SymmetricSegments::FreeMemory(void* memory) { nccl_->ncclMemFree(memory); }

absl::StatusOr<SymmetricSegment> SymmetricSegments::Register(void* memory, size_t bytes) {
  if (absl::Status s = RefuseDuringCapture("creation"); !s.ok()) {
    nccl_->ncclMemFree(memory);
    return s;
  }
  MutexLock comm_lock(&CommunicatorLock(comm_));
  ncclWindow_t window = nullptr;
  absl::Status registered = nccl_->Check(
      nccl_->ncclCommWindowRegister(comm_, memory, bytes, &window, NCCL_WIN_COLL_SYMMETRIC),
      absl::StrFormat("ncclCommWindowRegister(%p, %u, NCCL_WIN_COLL_SYMMETRIC)", memory, bytes));
  if (registered.ok() && window == nullptr) {
    registered = absl::FailedPreconditionError(
        "tidepool: ncclCommWindowRegister gave a NULL window: this communicator has no symmetric "
        "memory support (NCCL gives the same answer on every rank; fall back to ordinary "
        "buffers everywhere alike)");
  }
  if (!registered.ok()) {
    // Nothing half made: the memory goes back, unregistered.
    nccl_->ncclMemFree(memory);
    return registered;
  }
  MutexLock lock(&mu_);
  SymmetricSegment segment{reinterpret_cast<uintptr_t>(memory), bytes, window, next_ordinal_++};
  segments_.push_back(segment);
  ++registrations_;
  return segment;
}

absl::Status SymmetricSegments::Destroy(const SymmetricSegment& segment) {
  if (absl::Status s = RefuseDuringCapture("destruction"); !s.ok()) return s;
  MutexLock comm_lock(&CommunicatorLock(comm_));
  const auto same = [&](const SymmetricSegment& held) {
    return held.base == segment.base && held.window == segment.window;
  };
  {
    MutexLock lock(&mu_);
    if (std::find_if(segments_.begin(), segments_.end(), same) == segments_.end()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tidepool: symmetric segment %#x is not one this pool holds", segment.base));
    }
  }
  // Deregister first: NCCL must never see a window over freed memory. If it fails, the segment
  // stays held (registered, not freed) and the error says why.
  if (absl::Status s = nccl_->Check(nccl_->ncclCommWindowDeregister(comm_, segment.window),
                                    "ncclCommWindowDeregister");
      !s.ok()) {
    return s;
  }
  absl::Status freed = nccl_->Check(nccl_->ncclMemFree(reinterpret_cast<void*>(segment.base)),
                                    absl::StrFormat("ncclMemFree(%#x)", segment.base));
  MutexLock lock(&mu_);
  segments_.erase(std::find_if(segments_.begin(), segments_.end(), same));
  ++deregistrations_;
  return freed;
}

std::vector<SymmetricSegment> SymmetricSegments::segments() const {
  MutexLock lock(&mu_);
  return segments_;
}

int64_t SymmetricSegments::registrations() const {
  MutexLock lock(&mu_);
  return registrations_;
}

int64_t SymmetricSegments::deregistrations() const {
  MutexLock lock(&mu_);
  return deregistrations_;
}

}  // namespace tidepool
