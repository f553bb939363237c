// The symmetric pools of one process that drives several GPUs from one thread: one rank per GPU,
// each with its own communicator (as from ncclCommInitAll), each with its own SymmetricPool.
//
// Why a group: a pool's collective steps (the agreement exchange, the registration of a window)
// block until every rank of the communicator makes them. A pool that takes such a step for one
// rank while the same thread has yet to reach the other local ranks waits for itself: a hang.
// NCCL's answer is the group call: every local rank's part issued between ncclGroupStart and
// ncclGroupEnd, done at group end (docs/background.md §4). The group makes each collective step
// of its pools that way, for all of them at once:
//   * Reserve(bytes): the protocol of SymmetricPool::Reserve (symmetric_pool.h), every phase for
//     every local rank together: the ranks exchange (step, kind, size) (ExchangeTogether,
//     rank_agreement.h); every local rank allocates; a second exchange tells whether every rank
//     everywhere allocated; then every local rank registers, in one group
//     (SymmetricSegments::RegisterTogether).
//   * Trim(): the ranks agree on the wholly free segments, then every local rank deregisters them
//     in one group, and only then frees them (SymmetricSegments::DestroyTogether).
//   * The destructor gives back every segment of every local pool the same way (deregistration
//     is collective too): destroy the group before its SymmetricSegments, which would otherwise
//     give theirs back rank by rank.
// Allocate, Free and Lookup stay per device, on pool(i). A pool of a group never grows from
// Allocate (that growth would need every local rank at once, from inside one rank's Allocate):
// it answers RESOURCE_EXHAUSTED, saying to grow with the group's Reserve; and its own Reserve and
// Trim are refused (FAILED_PRECONDITION).
//
// Contract. The same-program rule (symmetric_pool.h, docs/nccl.md rule 6) holds per rank: every
// local rank makes the same per-device calls in the same order as every other rank of the
// communicator, and every process makes the same group calls. Placement is then the same on every
// rank. The other ranks of the communicators may be in other processes, driven by a group or
// by a thread each; the agreement cannot tell. Failures, as in the one-rank-per-thread layout:
//   * ranks that propose different steps (another process reserved another size): every local
//     rank's pool fails with FAILED_PRECONDITION ("the ranks diverged"), nothing registered;
//   * a rank missing or stalled: DEADLINE_EXCEEDED within the agreement timeout (one timeout for
//     the group, not one per local rank), nothing registered; a late rank fails at once;
//   * a failed ncclMemAlloc on any rank: every rank fails alike with RESOURCE_EXHAUSTED, nothing
//     registered, and the group stays usable;
//   * a registration that fails, or a NULL window, on any local rank: every local rank's memory
//     is freed, nothing stays registered.
// Except for the failed allocation, a failed step breaks every pool of the group together (the
// communicators are of no further use: a real one was aborted or is out of step), and every later
// step fails at once with FAILED_PRECONDITION; Free and Lookup of blocks still live keep working.
//
// Thread safety: every method may be called from any thread. The group's steps are serialized by
// its own lock, and hold every local pool's lock throughout, so no Allocate, Free or Lookup on a
// pool runs in the middle of one. Lock order: the group's mu_, then its pools' locks in rank
// order, then the communicators' locks (in address order) and the segments' locks
// (symmetric_segments.h).
#ifndef TIDEPOOL_NCCL_SYMMETRIC_GROUP_H_
#define TIDEPOOL_NCCL_SYMMETRIC_GROUP_H_

#include <cstddef>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/mutex.h"
#include "nccl/rank_agreement.h"
#include "nccl/symmetric_pool.h"
#include "nccl/symmetric_segments.h"

namespace tidepool {

class SymmetricPoolGroup {
 public:
  // One local rank: its communicator's segments and its agreement, which must outlive the group.
  struct LocalRank {
    SymmetricSegments* segments = nullptr;
    RankAgreement* agreement = nullptr;
  };

  // A pool for each local rank, in the order given, which must be increasing rank order (the
  // ranks of one process need not be consecutive). INVALID_ARGUMENT for no ranks, a missing
  // object, two ranks on one communicator, different NCCL libraries, agreements of different
  // sizes or out of rank order. Options::growth_bytes does not apply (a group's pools grow only
  // by Reserve); Options::agreement_timeout bounds each exchange of the whole group.
  static absl::StatusOr<std::unique_ptr<SymmetricPoolGroup>> Create(
      std::vector<LocalRank> ranks, SymmetricPool::Options options);
  // Gives back every segment of every local pool, deregistered in one group, then freed. Like
  // any collective, every process does it at the same point of its program. Errors are lost.
  ~SymmetricPoolGroup();
  SymmetricPoolGroup(const SymmetricPoolGroup&) = delete;
  SymmetricPoolGroup& operator=(const SymmetricPoolGroup&) = delete;

  // How many local ranks; pool(i) is the i-th, in rank order.
  int size() const { return static_cast<int>(pools_.size()); }
  SymmetricPool& pool(int i) { return *pools_.at(i); }
  const SymmetricPool& pool(int i) const { return *pools_.at(i); }

  // Collective, for every local rank at once: one segment of `bytes` in every pool (see the file
  // comment for the protocol and its errors).
  absl::Status Reserve(size_t bytes) ABSL_LOCKS_EXCLUDED(mu_);
  // Collective, for every local rank at once: gives back every segment with no live block.
  absl::Status Trim() ABSL_LOCKS_EXCLUDED(mu_);

 private:
  // Holds every pool's lock, in rank order (defined in symmetric_group.cc).
  class PoolLocks;

  SymmetricPoolGroup(std::vector<LocalRank> ranks, SymmetricPool::Options options);
  // Every local rank's agreement (for ExchangeTogether) and segments (for the group calls).
  std::vector<RankAgreement*> Agreements() const;
  std::vector<SymmetricSegments*> Segments() const;
  // Breaks every pool not broken yet, with `why`. Needs every pool's lock (PoolLocks).
  void BreakAll(const absl::Status& why) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Every local rank's step `proposals[i]`, exchanged in one group and judged by each pool; the
  // group broken on any failure.
  absl::Status AgreeTogether(const std::vector<Proposal>& proposals)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The first of several local ranks' outcomes that failed, naming its local rank; OK if none.
  static absl::Status FirstFailure(const std::vector<absl::Status>& outcomes);

  const std::vector<LocalRank> ranks_;
  const SymmetricPool::Options options_;
  // Never resized after Create.
  std::vector<std::unique_ptr<SymmetricPool>> pools_;
  // Serializes the group's collective steps; taken before the pools' locks.
  Mutex mu_;
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_SYMMETRIC_GROUP_H_
