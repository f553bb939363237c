// The segments of a symmetric pool: memory from ncclMemAlloc, each piece registered once as a
// symmetric window of one communicator (ncclCommWindowRegister, NCCL_WIN_COLL_SYMMETRIC), and
// deregistered before it is freed.
//
// docs/background.md §4 has the NCCL rules this file keeps:
//   * registration is collective: every rank creates and destroys the same segments, of the same
//     sizes, in the same order (the symmetric pool above this sees to it; this file does what one
//     rank does);
//   * each allocation is registered exactly once per communicator, and deregistered before
//     ncclMemFree, never after;
//   * NCCL's register and deregister calls on one communicator never run at once here: they take
//     the communicator's lock (CommunicatorLock), which everything in tidepool that registers on
//     that communicator shares. (A user's collectives on the communicator from another thread are
//     the user's to keep apart: docs/nccl.md.)
//   * nothing registers while a CUDA graph capture is underway on the device (registration may
//     synchronize, which would invalidate the capture): Create is refused then, with
//     FAILED_PRECONDITION; reserve beforehand;
//   * a registration that fails, or that yields a NULL window (the communicator has no symmetric
//     support), frees the memory again: no segment is ever left half made. A NULL window is
//     FAILED_PRECONDITION, and NCCL gives it on every rank alike, so every rank fails alike.
//
// ONE THREAD, SEVERAL GPUS. A process that drives several local ranks (one communicator per GPU)
// from one thread cannot register rank by rank: the first rank's registration blocks until the
// other local ranks register, which the same thread has not reached. RegisterTogether and
// DestroyTogether make the calls of every local rank between ncclGroupStart and ncclGroupEnd
// (NCCL fills the windows in at group end), then check each: a failure or a NULL window on any
// local rank deregisters the windows that were made (again in one group) and frees every local
// rank's memory, so nothing is left half registered. They take every local communicator's lock,
// in address order, for the whole group.
//
// Lock order: communicator locks (several: in increasing address order), then one object's mu_.
//
// Thread safety: every method may be called from any thread.
#ifndef TIDEPOOL_NCCL_SYMMETRIC_SEGMENTS_H_
#define TIDEPOOL_NCCL_SYMMETRIC_SEGMENTS_H_

#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/mutex.h"
#include "nccl/nccl_library.h"

namespace tidepool {

// One registered segment: its memory, its window, and its place in creation order (the same on
// every rank, unlike its address).
struct SymmetricSegment {
  uintptr_t base = 0;
  size_t bytes = 0;
  ncclWindow_t window = nullptr;
  uint64_t ordinal = 0;
};

// The lock every registration and deregistration on `comm` takes, process-wide.
Mutex& CommunicatorLock(ncclComm_t comm);

class SymmetricSegments {
 public:
  // `captures_underway` answers how many CUDA graph captures are underway on the device (the
  // caching allocator's count); nothing registers while it is non-zero. `nccl` and `comm` must
  // outlive this object.
  SymmetricSegments(const NcclLibrary* nccl, ncclComm_t comm,
                    std::function<int()> captures_underway);
  // As above; `make_current` makes the communicator's device current before ncclMemAlloc
  // (which allocates on the current device): one thread driving several GPUs needs it.
  SymmetricSegments(const NcclLibrary* nccl, ncclComm_t comm,
                    std::function<int()> captures_underway,
                    std::function<absl::Status()> make_current);
  // Deregisters and frees every segment still held (a pool that goes away takes its memory
  // with it; errors are lost, as in any destructor).
  ~SymmetricSegments();
  SymmetricSegments(const SymmetricSegments&) = delete;
  SymmetricSegments& operator=(const SymmetricSegments&) = delete;

  // Allocates `bytes` with ncclMemAlloc and registers them as one symmetric window. Collective
  // (see the file comment). FAILED_PRECONDITION during a capture, or for a NULL window;
  // NCCL's error (RESOURCE_EXHAUSTED when ncclMemAlloc finds no memory) otherwise, with nothing
  // left behind.
  absl::StatusOr<SymmetricSegment> Create(size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Create in two steps, for a pool that checks with the other ranks between them (a rank whose
  // allocation failed must not leave the others waiting in registration): memory first (local,
  // not collective; FreeMemory gives it back unregistered), then its registration (collective;
  // on failure the memory is freed, as for Create).
  absl::StatusOr<void*> AllocateMemory(size_t bytes);
  void FreeMemory(void* memory);
  absl::StatusOr<SymmetricSegment> Register(void* memory, size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Deregisters the segment, then frees it. Collective. INVALID_ARGUMENT for a segment this
  // object does not hold; FAILED_PRECONDITION during a capture (a graph may still use it).
  absl::Status Destroy(const SymmetricSegment& segment) ABSL_LOCKS_EXCLUDED(mu_);

  // One thread driving several local ranks (see ONE THREAD, SEVERAL GPUS): registers
  // `memory[i]` (`bytes`, from ranks[i]->AllocateMemory) on ranks[i]'s communicator, every call
  // inside one NCCL group, and returns each rank's segment, in the order of `ranks`. On any
  // failure every rank's memory is freed and nothing stays registered: FAILED_PRECONDITION
  // during a capture or for a NULL window on any rank (naming the ranks), NCCL's error
  // otherwise. Every object must use the same NcclLibrary and a communicator of its own.
  static absl::StatusOr<std::vector<SymmetricSegment>> RegisterTogether(
      const std::vector<SymmetricSegments*>& ranks, const std::vector<void*>& memory,
      size_t bytes);
  // Deregisters every (object, segment) pair inside one NCCL group, then frees each segment
  // whose deregistration succeeded. INVALID_ARGUMENT (nothing done) if an object does not hold
  // its segment; FAILED_PRECONDITION during a capture; NCCL's error otherwise, the segments
  // whose windows may still be live kept (registered, not freed).
  static absl::Status DestroyTogether(
      const std::vector<std::pair<SymmetricSegments*, SymmetricSegment>>& segments);

  // The held segments, in creation order.
  std::vector<SymmetricSegment> segments() const ABSL_LOCKS_EXCLUDED(mu_);
  // Windows registered and deregistered so far, over this object's life.
  int64_t registrations() const ABSL_LOCKS_EXCLUDED(mu_);
  int64_t deregistrations() const ABSL_LOCKS_EXCLUDED(mu_);
  ncclComm_t communicator() const { return comm_; }
  const NcclLibrary* nccl() const { return nccl_; }
  // FAILED_PRECONDITION naming `what` while a capture is underway on the device: the symmetric
  // pool asks before it agrees with the other ranks on a growth or a trim.
  absl::Status RefuseDuringCapture(const char* what) const;

 private:
  // Records a registered segment (the next number) and counts its registration.
  SymmetricSegment Record(void* memory, size_t bytes, ncclWindow_t window)
      ABSL_LOCKS_EXCLUDED(mu_);
  bool Holds(const SymmetricSegment& segment) const ABSL_LOCKS_EXCLUDED(mu_);
  // Forgets a deregistered segment and counts its deregistration.
  void Forget(const SymmetricSegment& segment) ABSL_LOCKS_EXCLUDED(mu_);

  const NcclLibrary* const nccl_;
  const ncclComm_t comm_;
  const std::function<int()> captures_underway_;
  const std::function<absl::Status()> make_current_;
  // A leaf lock, taken after the communicator's.
  mutable Mutex mu_;
  std::vector<SymmetricSegment> segments_ ABSL_GUARDED_BY(mu_);
  uint64_t next_ordinal_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t registrations_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t deregistrations_ ABSL_GUARDED_BY(mu_) = 0;
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_SYMMETRIC_SEGMENTS_H_
