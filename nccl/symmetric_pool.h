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
//     whose device is full makes every rank fail alike, the pool intact), and only then register.
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
// Thread safety: every method may be called from any thread; calls are serialized.
#ifndef TIDEPOOL_NCCL_SYMMETRIC_POOL_H_
#define TIDEPOOL_NCCL_SYMMETRIC_POOL_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <string>
#include <utility>

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

  // Collective: adds one segment of `bytes`, agreed by every rank first.
  absl::Status Reserve(size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // A block of at least `bytes` (rounded to 512), placed by the same-program rule; grows
  // collectively when nothing fits and Options::growth_bytes allows. RESOURCE_EXHAUSTED when it
  // may not grow; the agreement's error when the ranks do not agree.
  absl::StatusOr<void*> Allocate(size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Returns a block (reusable at once: see STREAMS). INVALID_ARGUMENT for a pointer that is not
  // a live block of this pool.
  absl::Status Free(void* ptr) ABSL_LOCKS_EXCLUDED(mu_);
  // The window and offset of the live block at `ptr`, or of the block containing it.
  absl::StatusOr<Location> Lookup(const void* ptr) const ABSL_LOCKS_EXCLUDED(mu_);
  // Collective: gives back every segment with no live block (agreed first: the ranks must hold
  // the same free segments, which the same-program rule ensures).
  absl::Status Trim() ABSL_LOCKS_EXCLUDED(mu_);
  Stats GetStats() const ABSL_LOCKS_EXCLUDED(mu_);
  // Every segment (number, window, address, size) and block, as JSON.
  std::string SnapshotJson() const ABSL_LOCKS_EXCLUDED(mu_);

 private:
  enum Kind : uint64_t {
    kReserve = 1,
    kGrow = 2,
    kTrim = 3,
    // The second round of making a segment: whether this rank's ncclMemAlloc succeeded.
    kAllocated = 4,
    kAllocationFailed = 5,
  };
  // (segment number, offset): the placement order.
  using Place = std::pair<uint64_t, size_t>;

  // Agrees with the other ranks on the next collective step; breaks the pool if they do not.
  absl::Status Agree(Kind kind, uint64_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes an agreed segment: allocates, checks with the other ranks that every allocation
  // succeeded, and only then registers. A rank whose allocation failed makes every rank fail
  // alike (RESOURCE_EXHAUSTED) with nothing registered, and the pool stays usable.
  absl::Status AddSegment(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status Broken() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The first free range (in placement order) that holds `bytes`, or end().
  std::map<Place, size_t>::iterator FirstFit(size_t bytes) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  SymmetricSegments* const segments_;
  RankAgreement* const agreement_;
  const Options options_;

  mutable Mutex mu_;
  // Set once the ranks failed to agree: the pool's communicator is of no further use.
  std::string broken_ ABSL_GUARDED_BY(mu_);
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
