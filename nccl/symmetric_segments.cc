// Registered symmetric segments: see symmetric_segments.h for the NCCL rules kept here.
#include "nccl/symmetric_segments.h"

#include <algorithm>
#include <chrono>
#include <memory>
#include <string>
#include <thread>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tidepool {
namespace {

// Every given communicator's lock, taken in increasing address order (so two threads that
// register on overlapping sets never deadlock) and held for the object's life. The set is known
// only at run time, which the thread-safety analysis cannot follow.
class CommunicatorLocks {
 public:
  explicit CommunicatorLocks(std::vector<ncclComm_t> comms) ABSL_NO_THREAD_SAFETY_ANALYSIS {
    std::sort(comms.begin(), comms.end());
    comms.erase(std::unique(comms.begin(), comms.end()), comms.end());
    for (ncclComm_t comm : comms) {
      locks_.push_back(&CommunicatorLock(comm));
      locks_.back()->Lock();
    }
  }
  ~CommunicatorLocks() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (auto lock = locks_.rbegin(); lock != locks_.rend(); ++lock) (*lock)->Unlock();
  }
  CommunicatorLocks(const CommunicatorLocks&) = delete;
  CommunicatorLocks& operator=(const CommunicatorLocks&) = delete;

 private:
  std::vector<Mutex*> locks_;
};

// ncclGroupEnd, then (non-blocking communicators answer ncclInProgress while the group's calls
// run) each communicator's asynchronous error until it has done its part.
absl::Status EndGroup(const NcclLibrary* nccl, const std::vector<ncclComm_t>& comms,
                      const char* what) {
  const ncclResult_t result = nccl->ncclGroupEnd();
  if (result != ncclSuccess && result != ncclInProgress) {
    return nccl->Check(result, absl::StrCat("ncclGroupEnd (", what, ")"));
  }
  for (ncclComm_t comm : comms) {
    for (;;) {
      ncclResult_t async = ncclSuccess;
      if (nccl->ncclCommGetAsyncError(comm, &async) != ncclSuccess) break;
      if (async == ncclInProgress) {
        std::this_thread::sleep_for(std::chrono::microseconds(50));
        continue;
      }
      if (absl::Status s = nccl->Check(async, absl::StrCat("ncclGroupEnd (", what, ")"));
          !s.ok()) {
        return s;
      }
      break;
    }
  }
  return absl::OkStatus();
}

absl::Status SameLibraryAndDistinctCommunicators(const std::vector<SymmetricSegments*>& ranks) {
  if (ranks.empty()) return absl::InvalidArgumentError("tidepool: no local ranks");
  std::vector<ncclComm_t> comms;
  for (SymmetricSegments* rank : ranks) {
    if (rank->nccl() != ranks[0]->nccl()) {
      return absl::InvalidArgumentError(
          "tidepool: local ranks of one group must use the same NCCL library");
    }
    comms.push_back(rank->communicator());
  }
  std::sort(comms.begin(), comms.end());
  if (std::adjacent_find(comms.begin(), comms.end()) != comms.end()) {
    return absl::InvalidArgumentError(
        "tidepool: two local ranks of one group share a communicator; each needs its own");
  }
  return absl::OkStatus();
}

}  // namespace

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
    : SymmetricSegments(nccl, comm, std::move(captures_underway), nullptr) {}

SymmetricSegments::SymmetricSegments(const NcclLibrary* nccl, ncclComm_t comm,
                                     std::function<int()> captures_underway,
                                     std::function<absl::Status()> make_current)
    : nccl_(nccl),
      comm_(comm),
      captures_underway_(std::move(captures_underway)),
      make_current_(std::move(make_current)) {}

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
  if (make_current_) {
    if (absl::Status s = make_current_(); !s.ok()) return s;
  }
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
  return Record(memory, bytes, window);
}

SymmetricSegment SymmetricSegments::Record(void* memory, size_t bytes, ncclWindow_t window) {
  MutexLock lock(&mu_);
  SymmetricSegment segment{reinterpret_cast<uintptr_t>(memory), bytes, window, next_ordinal_++};
  segments_.push_back(segment);
  ++registrations_;
  return segment;
}

bool SymmetricSegments::Holds(const SymmetricSegment& segment) const {
  MutexLock lock(&mu_);
  return std::any_of(segments_.begin(), segments_.end(), [&](const SymmetricSegment& held) {
    return held.base == segment.base && held.window == segment.window;
  });
}

void SymmetricSegments::Forget(const SymmetricSegment& segment) {
  MutexLock lock(&mu_);
  auto held = std::find_if(segments_.begin(), segments_.end(), [&](const SymmetricSegment& h) {
    return h.base == segment.base && h.window == segment.window;
  });
  if (held == segments_.end()) return;
  segments_.erase(held);
  ++deregistrations_;
}

absl::StatusOr<std::vector<SymmetricSegment>> SymmetricSegments::RegisterTogether(
    const std::vector<SymmetricSegments*>& ranks, const std::vector<void*>& memory,
    size_t bytes) {
  if (ranks.size() != memory.size()) {
    return absl::InvalidArgumentError("tidepool: one allocation per local rank");
  }
  const auto free_all = [&] {
    for (size_t i = 0; i < ranks.size(); ++i) ranks[i]->nccl_->ncclMemFree(memory[i]);
  };
  absl::Status refused = SameLibraryAndDistinctCommunicators(ranks);
  for (SymmetricSegments* rank : ranks) {
    if (refused.ok()) refused = rank->RefuseDuringCapture("creation");
  }
  if (!refused.ok()) {
    free_all();
    return refused;
  }
  const NcclLibrary* const nccl = ranks[0]->nccl_;
  std::vector<ncclComm_t> comms;
  for (SymmetricSegments* rank : ranks) comms.push_back(rank->comm_);
  CommunicatorLocks locks(comms);
  // Filled in at group end.
  std::vector<ncclWindow_t> windows(ranks.size(), nullptr);
  absl::Status failure = nccl->Check(nccl->ncclGroupStart(), "ncclGroupStart (registration)");
  if (!failure.ok()) {
    free_all();
    return failure;
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    absl::Status called = nccl->Check(
        nccl->ncclCommWindowRegister(comms[i], memory[i], bytes, &windows[i],
                                     NCCL_WIN_COLL_SYMMETRIC),
        absl::StrFormat("ncclCommWindowRegister(%p, %u, NCCL_WIN_COLL_SYMMETRIC) of local rank %u",
                        memory[i], bytes, i));
    if (failure.ok()) failure = called;
  }
  if (absl::Status ended = EndGroup(nccl, comms, "registration"); failure.ok()) failure = ended;
  std::string null_ranks;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (windows[i] == nullptr) absl::StrAppend(&null_ranks, null_ranks.empty() ? "" : ", ", i);
  }
  if (failure.ok() && !null_ranks.empty()) {
    failure = absl::FailedPreconditionError(absl::StrCat(
        "tidepool: ncclCommWindowRegister gave a NULL window on local rank(s) ", null_ranks,
        ": the communicator has no symmetric memory support (NCCL gives the same answer on every "
        "rank; fall back to ordinary buffers everywhere alike); every local rank's memory was "
        "freed"));
  }
  if (failure.ok()) {
    std::vector<SymmetricSegment> made;
    for (size_t i = 0; i < ranks.size(); ++i) {
      made.push_back(ranks[i]->Record(memory[i], bytes, windows[i]));
    }
    return made;
  }
  // Nothing half made: the windows that were made go again, in one group as they came (their
  // deregistration is collective too), then every rank's memory.
  std::vector<ncclComm_t> made_on;
  for (size_t i = 0; i < ranks.size(); ++i) {
    if (windows[i] != nullptr) made_on.push_back(comms[i]);
  }
  absl::Status undone;
  if (!made_on.empty()) {
    undone = nccl->Check(nccl->ncclGroupStart(), "ncclGroupStart (undoing a registration)");
    if (undone.ok()) {
      for (size_t i = 0; i < ranks.size(); ++i) {
        if (windows[i] == nullptr) continue;
        absl::Status called = nccl->Check(nccl->ncclCommWindowDeregister(comms[i], windows[i]),
                                          "ncclCommWindowDeregister (undoing a registration)");
        if (undone.ok()) undone = called;
      }
      if (absl::Status ended = EndGroup(nccl, made_on, "undoing a registration"); undone.ok()) {
        undone = ended;
      }
    }
  }
  for (size_t i = 0; i < ranks.size(); ++i) {
    // Memory under a window that may still be live is kept: a leak, not a use after free.
    if (windows[i] == nullptr || undone.ok()) nccl->ncclMemFree(memory[i]);
  }
  if (!undone.ok()) {
    return absl::Status(failure.code(),
                        absl::StrCat(failure.message(), "; and undoing the windows made failed (",
                                     undone.message(), "): their memory is kept"));
  }
  return failure;
}

absl::Status SymmetricSegments::DestroyTogether(
    const std::vector<std::pair<SymmetricSegments*, SymmetricSegment>>& segments) {
  if (segments.empty()) return absl::OkStatus();
  std::vector<ncclComm_t> comms;
  for (const auto& [source, segment] : segments) {
    if (absl::Status s = source->RefuseDuringCapture("destruction"); !s.ok()) return s;
    if (source->nccl_ != segments[0].first->nccl_) {
      return absl::InvalidArgumentError(
          "tidepool: local ranks of one group must use the same NCCL library");
    }
    comms.push_back(source->comm_);
  }
  const NcclLibrary* const nccl = segments[0].first->nccl_;
  CommunicatorLocks locks(comms);
  for (const auto& [source, segment] : segments) {
    if (!source->Holds(segment)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tidepool: symmetric segment %#x is not one this pool holds; nothing was done",
          segment.base));
    }
  }
  // Deregister first: NCCL must never see a window over freed memory.
  if (absl::Status s = nccl->Check(nccl->ncclGroupStart(), "ncclGroupStart (deregistration)");
      !s.ok()) {
    return s;
  }
  std::vector<absl::Status> called;
  for (const auto& [source, segment] : segments) {
    called.push_back(nccl->Check(nccl->ncclCommWindowDeregister(source->comm_, segment.window),
                                 "ncclCommWindowDeregister"));
  }
  if (absl::Status ended = EndGroup(nccl, comms, "deregistration"); !ended.ok()) {
    // Which windows went is unknown: every segment stays held, registered, not freed.
    return absl::Status(ended.code(), absl::StrCat(ended.message(),
                                                   "; no segment was freed (their windows may "
                                                   "still be live)"));
  }
  absl::Status outcome;
  for (size_t i = 0; i < segments.size(); ++i) {
    const auto& [source, segment] = segments[i];
    if (!called[i].ok()) {
      if (outcome.ok()) outcome = called[i];
      continue;
    }
    absl::Status freed =
        nccl->Check(nccl->ncclMemFree(reinterpret_cast<void*>(segment.base)),
                    absl::StrFormat("ncclMemFree(%#x)", segment.base));
    if (outcome.ok()) outcome = freed;
    source->Forget(segment);
  }
  return outcome;
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
