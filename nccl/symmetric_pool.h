// A symmetric pool: buffers from one communicator's symmetric segments, placed alike on every
// rank, so that a collective finds its buffer at the same offset of the same window everywhere.
//
// THE SAME-PROGRAM RULE (stated once, here). Every rank of the communicator makes the same
// sequence of pool calls (Reserve, Allocate, Free, Trim) with the same sizes. Then:
//   * placement is a pure function of that sequence: segments are numbered in creation order
//     (the same on every rank; their addresses are not), and a block goes first-fit by (segment
//     number, offset). Nothing else enters: no address, no event, no timing, no other pool;
//   * growth happens at points every rank reaches together: a collective Reserve, or an Allocate
//     that finds no room. Before registering, the ranks exchange (growth number, kind, size)
//     (rank_agreement.h), allocate, exchange again whether every allocation succeeded (a rank
//     whose device is full makes every rank fail alike, the pool intact), and only then register;
//     a third exchange then tells every rank whether every rank got its window (a NULL window or
//     a failed registration on some ranks only breaks the pool on every rank alike).
//     A rank that diverged, is missing or is stalled makes every rank's call fail within the
//     agreement timeout, with no registration made; the pool is then broken (every later call
//     fails at once, FAILED_PRECONDITION), since its communicator is of no further use.
// Placement and growth need no lock across ranks; within a process the pool takes its own lock.
//
// STREAMS. A freed block is reusable at once by the next allocation, in stream order: the pool
// assumes that every use of its buffers is ordered on one stream (the one the communicator's
// collectives run on, as in sglang). A program that also uses a buffer on another stream
// synchronizes that stream before freeing the buffer. Deferring reuse until events complete
// would make placement depend on their timing, which differs between ranks.
//
// ONE THREAD, SEVERAL GPUS. A pool whose rank is one of several that one thread drives (a
// SymmetricPoolGroup, symmetric_group.h) cannot take a collective step on its own: the step
// would wait for the other local ranks, which the same thread has not reached. Such a pool
// serves Allocate, Free and Lookup as any other, but never grows from Allocate (it answers
// RESOURCE_EXHAUSTED, saying to Reserve through the group) and refuses its own Reserve and Trim;
// the group makes those steps for all its pools at once.
//
// Thread safety: every method may be called from any thread; calls are serialized. Lock order:
// mu_, then the communicator's lock, then the segments' lock (symmetric_segments.h); a group
// takes its pools' mu_ in rank order.
#ifndef TIDEPOOL_NCCL_SYMMETRIC_POOL_H_
#define TIDEPOOL_NCCL_SYMMETRIC_POOL_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "allocator/mutex.h"
#include "nccl/rank_agreement.h"
#include "nccl/symmetric_segments.h"

namespace tidepool {

class SymmetricPool {
 public:
  struct Options {
    // An Allocate that finds no room grows by at least this much (collectively); 0 forbids
    // growth outside Reserve.
    size_t growth_bytes = size_t{64} << 20;
    // How long the ranks wait for each other at a growth or a trim.
    absl::Duration agreement_timeout = absl::Seconds(30);
  };
  // Where a live block lies: its segment's window and the offset from the window's start.
  struct Location {
    ncclWindow_t window = nullptr;
    uint64_t segment = 0;  // the segment's number (creation order)
    size_t offset = 0;
    size_t bytes = 0;      // the block's size, as placed
  };
  struct Stats {
    int64_t segments = 0;
    int64_t reserved_bytes = 0;
    int64_t live_blocks = 0;
    int64_t live_bytes = 0;
    int64_t growths = 0;
  };

  // `segments` and `agreement` must outlive the pool; they belong to one communicator.
  SymmetricPool(SymmetricSegments* segments, RankAgreement* agreement, Options options);
  SymmetricPool(const SymmetricPool&) = delete;
  SymmetricPool& operator=(const SymmetricPool&) = delete;

  // Collective: adds one segment of `bytes`, agreed by every rank first. FAILED_PRECONDITION
  // for a pool of a group (the group's Reserve makes this step).
  absl::Status Reserve(size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // A block of at least `bytes` (rounded to 512), placed by the same-program rule; grows
  // collectively when nothing fits and Options::growth_bytes allows. RESOURCE_EXHAUSTED when it
  // may not grow (always, in a pool of a group); the agreement's error when the ranks do not
  // agree.
  absl::StatusOr<void*> Allocate(size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Returns a block (reusable at once: see STREAMS). INVALID_ARGUMENT for a pointer outside the
  // pool's segments, FAILED_PRECONDITION for one inside them that is not a live block (a double
  // free, a pointer into a block): the allocator's convention (pool/external_pool.h).
  absl::Status Free(void* ptr) ABSL_LOCKS_EXCLUDED(mu_);
  // The window and offset of the live block at `ptr`, or of the block containing it.
  absl::StatusOr<Location> Lookup(const void* ptr) const ABSL_LOCKS_EXCLUDED(mu_);
  // Collective: gives back every segment with no live block (agreed first: the ranks must hold
  // the same free segments, which the same-program rule ensures). FAILED_PRECONDITION for a pool
  // of a group (the group's Trim makes this step).
  absl::Status Trim() ABSL_LOCKS_EXCLUDED(mu_);
  Stats GetStats() const ABSL_LOCKS_EXCLUDED(mu_);
  // Whether the ranks failed to agree (every later call fails at once). A broken pool's segments
  // cannot be given back: deregistering is collective, and its communicator can no longer run a
  // collective (it may have been aborted).
  bool broken() const ABSL_LOCKS_EXCLUDED(mu_);
  // The size of the live block that starts at `ptr`: INVALID_ARGUMENT when no segment of the
  // pool holds `ptr`, FAILED_PRECONDITION when one does but no live block starts there (freed
  // already, or a pointer into a block). The allocator's convention (pool/external_pool.h).
  absl::StatusOr<size_t> LiveBlockSize(const void* ptr) const ABSL_LOCKS_EXCLUDED(mu_);
  // Every segment (number, window, address, size) and block, as JSON.
  std::string SnapshotJson() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // Makes the collective steps of pools whose ranks one thread drives, with the pieces below.
  friend class SymmetricPoolGroup;

  enum Kind : uint64_t {
    kReserve = 1,
    kGrow = 2,
    kTrim = 3,
    // The second round of making a segment: whether this rank's ncclMemAlloc succeeded.
    kAllocated = 4,
    kAllocationFailed = 5,
    // The third round: whether this rank's registration gave a window.
    kRegistered = 6,
    kRegistrationFailed = 7,
  };
  // (segment number, offset): the placement order.
  using Place = std::pair<uint64_t, size_t>;

  // Agrees with the other ranks on the next collective step; breaks the pool if they do not.
  absl::Status Agree(Kind kind, uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // --- The pieces of a collective step, shared with SymmetricPoolGroup ---------------------------
  // This pool's proposal for its next step.
  Proposal Propose(uint64_t kind, uint64_t bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return Proposal{next_step_, kind, bytes};
  }
  // What the exchange of `mine` says: OK (and the step counted) when every rank proposed the
  // same; otherwise the error (FAILED_PRECONDITION for ranks that diverged, the agreement's
  // error for a failed exchange), and the pool broken.
  absl::Status Judge(const Proposal& mine, const absl::StatusOr<std::vector<Proposal>>& all)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What the exchange of allocation reports says (mine: this rank's ncclMemAlloc): OK (and the
  // step counted) when every rank allocated `bytes`; RESOURCE_EXHAUSTED naming the ranks that
  // did not, the pool intact; the agreement's error, the pool broken, when the exchange failed.
  absl::Status JudgeAllocations(size_t bytes, const absl::Status& mine,
                                const absl::StatusOr<std::vector<Proposal>>& all)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // What the exchange of registration reports says (mine: this rank's registration): OK, the
  // segment adopted, when every rank got a window; otherwise the pool broken (a window made here
  // is kept unused: deregistering is collective, and the ranks without one would not come) and
  // FAILED_PRECONDITION naming the ranks, or the agreement's error.
  absl::Status JudgeRegistrations(size_t bytes,
                                  const absl::StatusOr<SymmetricSegment>& mine,
                                  const absl::StatusOr<std::vector<Proposal>>& all)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Puts a registered segment into placement, wholly free.
  void Adopt(const SymmetricSegment& segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Holds a registered segment that nothing may be placed in (a pool that broke making it).
  void Keep(const SymmetricSegment& segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    held_[segment.ordinal] = segment;
  }
  // The numbers of the wholly free segments, and their bytes.
  std::vector<uint64_t> EmptySegments(uint64_t* bytes) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes a given-back segment out of placement.
  void Drop(uint64_t number) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // For SymmetricPoolGroup, which holds this pool's mu_ through each of its collective steps (it
  // locks its pools in rank order, a number known only at run time): tells the analysis so.
  void HeldByGroup() const ABSL_ASSERT_EXCLUSIVE_LOCK(mu_) {}
  // The refusal of a step that only the group can make.
  absl::Status GroupOnly(const char* what, const char* call) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes an agreed segment: allocates, checks with the other ranks that every allocation
  // succeeded, and only then registers. A rank whose allocation failed makes every rank fail
  // alike (RESOURCE_EXHAUSTED) with nothing registered, and the pool stays usable.
  absl::Status AddSegment(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Broken() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The error for `operation` on a pointer that is not a live block: FAILED_PRECONDITION inside
  // a segment, INVALID_ARGUMENT outside every segment.
  absl::Status NotLive(const void* ptr, const char* operation) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The first free range (in placement order) that holds `bytes`, or end().
  std::map<Place, size_t>::iterator FirstFit(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  SymmetricSegments* const segments_;
  RankAgreement* const agreement_;
  const Options options_;

  mutable Mutex mu_;
  // Set once the ranks failed to agree: the pool's communicator is of no further use.
  std::string broken_ ABSL_GUARDED_BY(mu_);
  // Non-zero: this pool is one of a group of this many local ranks driven by one thread, and
  // makes no collective step of its own.
  int group_ranks_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t next_step_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t growths_ ABSL_GUARDED_BY(mu_) = 0;
  // Segments by number.
  std::map<uint64_t, SymmetricSegment> held_ ABSL_GUARDED_BY(mu_);
  // Free ranges: (segment, offset) -> bytes. Adjacent free ranges are always merged.
  std::map<Place, size_t> free_ ABSL_GUARDED_BY(mu_);
  // Live blocks by address -> (segment, offset, bytes).
  struct Live {
    uint64_t segment;
    size_t offset;
    size_t bytes;
  };
  std::map<uintptr_t, Live> live_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_SYMMETRIC_POOL_H_
