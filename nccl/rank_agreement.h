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
//
// ONE THREAD, SEVERAL RANKS. A process that drives several GPUs from one thread (one communicator
// per GPU, as from ncclCommInitAll) cannot exchange rank by rank: the first rank's exchange waits
// for the others, which the same thread has not reached. So the exchange comes in two halves:
// Start enqueues this rank's part without waiting, Finish waits for the result; and
// ExchangeTogether (below) starts every local rank's part inside one group (ncclGroupStart/End
// for NCCL) and then finishes each, under one deadline. Exchange is Start then Finish, for a rank
// with a thread of its own.
#ifndef TIDEPOOL_NCCL_RANK_AGREEMENT_H_
#define TIDEPOOL_NCCL_RANK_AGREEMENT_H_

#include <algorithm>
#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
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
  // Start then Finish, unless an implementation does better.
  virtual absl::StatusOr<std::vector<Proposal>> Exchange(const Proposal& mine,
                                                         absl::Duration timeout) {
    if (absl::Status s = Start(mine); !s.ok()) return s;
    return Finish(timeout);
  }

  // The two halves of Exchange. Start sends this rank's proposal without waiting for any other
  // rank (inside a group it only enqueues); Finish waits for every rank's, with Exchange's
  // errors. One Start, then one Finish, then the next Start. An agreement that cannot be split
  // answers UNIMPLEMENTED, and cannot serve a group of local ranks.
  virtual absl::Status Start(const Proposal& mine) {
    (void)mine;
    return absl::UnimplementedError(
        "tidepool: this rank agreement cannot exchange in two halves, so it cannot serve "
        "several ranks driven by one thread");
  }
  virtual absl::StatusOr<std::vector<Proposal>> Finish(absl::Duration timeout) {
    (void)timeout;
    return absl::FailedPreconditionError("tidepool: Finish without a Start");
  }
  // The brackets of a group of Starts made by one thread (ncclGroupStart and ncclGroupEnd for
  // NCCL: process-wide per thread, so any of the group's agreements may make them). Nothing for
  // an agreement whose Start never waits.
  virtual absl::Status GroupStart() { return absl::OkStatus(); }
  virtual absl::Status GroupEnd() { return absl::OkStatus(); }
};

// Exchanges `mine[i]` for `agreements[i]`, for several local ranks driven by this one thread:
// every Start inside one group, then every Finish, all within one `timeout` (not one per rank).
// Returns each local rank's answer, as Exchange would. If any local rank cannot start, or the
// group cannot end, the others are finished with no time left (so a real communicator is
// aborted at once rather than left waiting for a part that never came): every local rank fails.
inline std::vector<absl::StatusOr<std::vector<Proposal>>> ExchangeTogether(
    const std::vector<RankAgreement*>& agreements, const std::vector<Proposal>& mine,
    absl::Duration timeout) {
  std::vector<absl::StatusOr<std::vector<Proposal>>> answers;
  if (agreements.empty() || agreements.size() != mine.size()) {
    answers.assign(agreements.size(),
                   absl::InvalidArgumentError("tidepool: one proposal per local rank"));
    return answers;
  }
  const absl::Time deadline = absl::Now() + timeout;
  absl::Status group = agreements[0]->GroupStart();
  std::vector<absl::Status> started(agreements.size(),
                                    absl::CancelledError("tidepool: not started"));
  if (group.ok()) {
    for (size_t i = 0; i < agreements.size(); ++i) started[i] = agreements[i]->Start(mine[i]);
    group = agreements[0]->GroupEnd();
  }
  absl::Status first_failure = group;
  for (const absl::Status& s : started) {
    if (first_failure.ok() && !s.ok()) first_failure = s;
  }
  for (size_t i = 0; i < agreements.size(); ++i) {
    if (!group.ok()) {
      if (started[i].ok()) agreements[i]->Finish(absl::ZeroDuration()).IgnoreError();
      answers.push_back(absl::Status(
          group.code(), absl::StrCat("tidepool: the group of local ranks' agreement failed: ",
                                     group.message())));
    } else if (!started[i].ok()) {
      answers.push_back(started[i]);
    } else if (!first_failure.ok()) {
      agreements[i]->Finish(absl::ZeroDuration()).IgnoreError();
      answers.push_back(absl::Status(
          first_failure.code(),
          absl::StrCat("tidepool: another local rank could not start the agreement: ",
                       first_failure.message())));
    } else {
      answers.push_back(agreements[i]->Finish(std::max(deadline - absl::Now(),
                                                       absl::ZeroDuration())));
    }
  }
  return answers;
}

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_RANK_AGREEMENT_H_
