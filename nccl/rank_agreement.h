// How the ranks of a communicator agree before a collective step of a symmetric pool.
//
// Growing a symmetric pool registers a window, which is collective and blocking: if one rank
// registers and another does not, the first waits forever (docs/background.md §4). So before any
// rank registers, all ranks exchange what they are about to do (a growth's sequence number and
// size) and go ahead only if every rank proposed the same. The exchange itself must not hang
// when a rank is missing or stalled: it ends within a timeout, and then the communicator is of no
// further use (a real one is aborted: NCCL can leave a half-done collective behind).
//
// A narrow seam: the symmetric pool needs this one call. The NCCL implementation all-gathers the
// proposals on a non-blocking communicator, polling ncclCommGetAsyncError until the timeout; the
// tests' implementation (tests/nccl/thread_agreement.h) is a rendezvous of threads that can be
// told to diverge or to stall a rank.
#ifndef TIDEPOOL_NCCL_RANK_AGREEMENT_H_
#define TIDEPOOL_NCCL_RANK_AGREEMENT_H_

#include <cstdint>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tidepool {

// What a rank is about to do: its pool's n-th collective step (`sequence`), of `kind`, for
// `bytes`. Every field must match on every rank.
struct Proposal {
  uint64_t sequence = 0;
  uint64_t kind = 0;
  uint64_t bytes = 0;

  bool operator==(const Proposal& other) const {
    return sequence == other.sequence && kind == other.kind && bytes == other.bytes;
  }
};

class RankAgreement {
 public:
  virtual ~RankAgreement() = default;
  virtual int rank() const = 0;
  virtual int ranks() const = 0;
  // Every rank passes its proposal; returns every rank's, indexed by rank. DEADLINE_EXCEEDED
  // when not every rank was heard within `timeout` (the communicator is then unusable, and every
  // later call fails at once with FAILED_PRECONDITION); UNAVAILABLE when the communicator failed.
  virtual absl::StatusOr<std::vector<Proposal>> Exchange(const Proposal& mine,
                                                         absl::Duration timeout) = 0;
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_RANK_AGREEMENT_H_
