// The symmetric pools of one thread's local ranks: see symmetric_group.h for why every
// collective step goes through NCCL's group calls, and for the failure semantics.
#include "nccl/symmetric_group.h"

#include <algorithm>
#include <string>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tidepool {

// Every pool's lock, in rank order, for the life of a collective step. The number of pools is
// known only at run time, which the thread-safety analysis cannot follow: each use of a pool's
// guarded state under it says so with SymmetricPool::HeldByGroup.
class SymmetricPoolGroup::PoolLocks {
 public:
  explicit PoolLocks(const std::vector<std::unique_ptr<SymmetricPool>>& pools)
      ABSL_NO_THREAD_SAFETY_ANALYSIS : pools_(pools) {
    for (const auto& pool : pools_) pool->mu_.Lock();
  }
  ~PoolLocks() ABSL_NO_THREAD_SAFETY_ANALYSIS {
    for (auto pool = pools_.rbegin(); pool != pools_.rend(); ++pool) (*pool)->mu_.Unlock();
  }
  PoolLocks(const PoolLocks&) = delete;
  PoolLocks& operator=(const PoolLocks&) = delete;

 private:
  const std::vector<std::unique_ptr<SymmetricPool>>& pools_;
};

absl::StatusOr<std::unique_ptr<SymmetricPoolGroup>> SymmetricPoolGroup::Create(
    std::vector<LocalRank> ranks, SymmetricPool::Options options) {
  if (ranks.empty()) {
    return absl::InvalidArgumentError("tidepool: a symmetric pool group of no local ranks");
  }
  std::vector<ncclComm_t> comms;
  for (size_t i = 0; i < ranks.size(); ++i) {
    const LocalRank& rank = ranks[i];
    if (rank.segments == nullptr || rank.agreement == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrCat("tidepool: local rank ", i, " of a symmetric pool group lacks its "
                       "segments or its agreement"));
    }
    if (rank.segments->nccl() != ranks[0].segments->nccl()) {
      return absl::InvalidArgumentError(
          "tidepool: the local ranks of a symmetric pool group must use one NCCL library");
    }
    if (rank.agreement->ranks() != ranks[0].agreement->ranks()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tidepool: local rank %u's communicator has %d ranks, local rank 0's %d: a group's "
          "communicators must be of one size",
          i, rank.agreement->ranks(), ranks[0].agreement->ranks()));
    }
    if (i > 0 && rank.agreement->rank() <= ranks[i - 1].agreement->rank()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tidepool: the local ranks of a symmetric pool group must come in increasing rank "
          "order (rank %d after rank %d)",
          rank.agreement->rank(), ranks[i - 1].agreement->rank()));
    }
    comms.push_back(rank.segments->communicator());
  }
  std::sort(comms.begin(), comms.end());
  if (std::adjacent_find(comms.begin(), comms.end()) != comms.end()) {
    return absl::InvalidArgumentError(
        "tidepool: two local ranks of a symmetric pool group share a communicator; each rank "
        "needs its own (one per GPU, as from ncclCommInitAll)");
  }
  return std::unique_ptr<SymmetricPoolGroup>(
      new SymmetricPoolGroup(std::move(ranks), options));
}

SymmetricPoolGroup::SymmetricPoolGroup(std::vector<LocalRank> ranks,
                                       SymmetricPool::Options options)
    : ranks_(std::move(ranks)), options_(options) {
  for (const LocalRank& rank : ranks_) {
    pools_.push_back(std::make_unique<SymmetricPool>(rank.segments, rank.agreement, options_));
    SymmetricPool& pool = *pools_.back();
    MutexLock lock(&pool.mu_);
    pool.group_ranks_ = static_cast<int>(ranks_.size());
  }
}

SymmetricPoolGroup::~SymmetricPoolGroup() {
  MutexLock group(&mu_);
  PoolLocks locks(pools_);
  std::vector<std::pair<SymmetricSegments*, SymmetricSegment>> all;
  for (size_t i = 0; i < pools_.size(); ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    for (const auto& [number, segment] : pool.held_) all.emplace_back(ranks_[i].segments, segment);
  }
  SymmetricSegments::DestroyTogether(all).IgnoreError();
}

std::vector<RankAgreement*> SymmetricPoolGroup::Agreements() const {
  std::vector<RankAgreement*> agreements;
  for (const LocalRank& rank : ranks_) agreements.push_back(rank.agreement);
  return agreements;
}

std::vector<SymmetricSegments*> SymmetricPoolGroup::Segments() const {
  std::vector<SymmetricSegments*> segments;
  for (const LocalRank& rank : ranks_) segments.push_back(rank.segments);
  return segments;
}

void SymmetricPoolGroup::BreakAll(const absl::Status& why) {
  for (size_t i = 0; i < pools_.size(); ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    if (pool.broken_.empty()) {
      pool.broken_ = absl::StrCat("a collective step of its group of local ranks failed: ",
                                  why.message());
    }
  }
}

absl::Status SymmetricPoolGroup::AgreeTogether(const std::vector<Proposal>& proposals) {
  std::vector<absl::StatusOr<std::vector<Proposal>>> answers =
      ExchangeTogether(Agreements(), proposals, options_.agreement_timeout);
  std::vector<absl::Status> outcomes(pools_.size());
  for (size_t i = 0; i < pools_.size(); ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    outcomes[i] = pool.Judge(proposals[i], answers[i]);
  }
  absl::Status failed = FirstFailure(outcomes);
  if (!failed.ok()) BreakAll(failed);
  return failed;
}

absl::Status SymmetricPoolGroup::FirstFailure(const std::vector<absl::Status>& outcomes) {
  for (size_t i = 0; i < outcomes.size(); ++i) {
    if (outcomes[i].ok()) continue;
    if (outcomes.size() == 1) return outcomes[i];
    return absl::Status(outcomes[i].code(),
                        absl::StrCat(outcomes[i].message(), " [local rank ", i, " of ",
                                     outcomes.size(), " driven by this thread]"));
  }
  return absl::OkStatus();
}

absl::Status SymmetricPoolGroup::Reserve(size_t bytes) {
  if (bytes == 0) return absl::InvalidArgumentError("tidepool: a reserve of 0 bytes");
  MutexLock group(&mu_);
  PoolLocks locks(pools_);
  const size_t n = pools_.size();
  // Refusals that ask no other rank, alike on every rank: a broken group, a capture.
  for (size_t i = 0; i < n; ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    if (absl::Status s = pool.Broken(); !s.ok()) return s;
    if (absl::Status s = ranks_[i].segments->RefuseDuringCapture("creation"); !s.ok()) return s;
  }
  // 1. Every rank agrees on the step.
  std::vector<Proposal> proposals(n);
  for (size_t i = 0; i < n; ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    proposals[i] = pool.Propose(SymmetricPool::kReserve, bytes);
  }
  if (absl::Status agreed = AgreeTogether(proposals); !agreed.ok()) return agreed;
  // 2. Every local rank allocates; every rank everywhere reports whether it could.
  std::vector<absl::StatusOr<void*>> memory;
  for (size_t i = 0; i < n; ++i) memory.push_back(ranks_[i].segments->AllocateMemory(bytes));
  for (size_t i = 0; i < n; ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    proposals[i] = pool.Propose(
        memory[i].ok() ? SymmetricPool::kAllocated : SymmetricPool::kAllocationFailed, bytes);
  }
  std::vector<absl::StatusOr<std::vector<Proposal>>> answers =
      ExchangeTogether(Agreements(), proposals, options_.agreement_timeout);
  std::vector<absl::Status> outcomes(n);
  bool broke = false;
  for (size_t i = 0; i < n; ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    outcomes[i] = pool.JudgeAllocations(bytes, memory[i].status(), answers[i]);
    broke = broke || !pool.broken_.empty();
  }
  if (absl::Status failed = FirstFailure(outcomes); !failed.ok()) {
    for (size_t i = 0; i < n; ++i) {
      if (memory[i].ok()) ranks_[i].segments->FreeMemory(*memory[i]);
    }
    // An allocation that failed somewhere leaves the pools intact (every rank knows, and none
    // registers); a failed exchange does not.
    if (broke) BreakAll(failed);
    return failed;
  }
  // 3. Every local rank registers, in one group.
  std::vector<void*> allocated;
  for (const absl::StatusOr<void*>& m : memory) allocated.push_back(*m);
  absl::StatusOr<std::vector<SymmetricSegment>> made =
      SymmetricSegments::RegisterTogether(Segments(), allocated, bytes);
  // 4. Every rank everywhere reports whether it got its window (a rank that alone failed must
  // not leave the others placing in a segment it lacks: symmetric_pool.cc, AddSegment). A local
  // failure was cleaned up for every local rank by RegisterTogether, so all report it.
  std::vector<absl::StatusOr<SymmetricSegment>> mine;
  for (size_t i = 0; i < n; ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    if (made.ok()) {
      mine.push_back((*made)[i]);
    } else {
      mine.push_back(absl::Status(made.status().code(),
                                  absl::StrCat("registering on every local rank failed: ",
                                               made.status().message())));
    }
    proposals[i] = pool.Propose(
        made.ok() ? SymmetricPool::kRegistered : SymmetricPool::kRegistrationFailed, bytes);
  }
  answers = ExchangeTogether(Agreements(), proposals, options_.agreement_timeout);
  for (size_t i = 0; i < n; ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    outcomes[i] = pool.JudgeRegistrations(bytes, mine[i], answers[i]);
  }
  if (absl::Status failed = FirstFailure(outcomes); !failed.ok()) {
    BreakAll(failed);
    return failed;
  }
  return absl::OkStatus();
}

absl::Status SymmetricPoolGroup::Trim() {
  MutexLock group(&mu_);
  PoolLocks locks(pools_);
  const size_t n = pools_.size();
  std::vector<std::vector<uint64_t>> empty(n);
  std::vector<Proposal> proposals(n);
  for (size_t i = 0; i < n; ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    if (absl::Status s = pool.Broken(); !s.ok()) return s;
    if (absl::Status s = ranks_[i].segments->RefuseDuringCapture("destruction"); !s.ok()) {
      return s;
    }
    uint64_t empty_bytes = 0;
    empty[i] = pool.EmptySegments(&empty_bytes);
    proposals[i] = pool.Propose(SymmetricPool::kTrim, empty_bytes);
  }
  if (absl::Status agreed = AgreeTogether(proposals); !agreed.ok()) return agreed;
  // The same-program rule gives every local pool the same free segments; the exchange compared
  // only their bytes.
  for (size_t i = 1; i < n; ++i) {
    if (empty[i] == empty[0]) continue;
    const absl::Status failed = absl::FailedPreconditionError(absl::StrFormat(
        "tidepool: the local ranks diverged: local rank %u holds other free segments than local "
        "rank 0. Every rank must make the same symmetric-pool calls with the same sizes "
        "(docs/nccl.md); nothing was given back",
        i));
    BreakAll(failed);
    return failed;
  }
  std::vector<std::pair<SymmetricSegments*, SymmetricSegment>> going;
  for (uint64_t number : empty[0]) {
    for (size_t i = 0; i < n; ++i) {
      SymmetricPool& pool = *pools_[i];
      pool.HeldByGroup();
      going.emplace_back(ranks_[i].segments, pool.held_.at(number));
    }
  }
  // Deregistered in one group, then freed: a segment is freed only once its window is gone.
  const absl::Status destroyed = SymmetricSegments::DestroyTogether(going);
  for (size_t i = 0; i < n; ++i) {
    SymmetricPool& pool = *pools_[i];
    pool.HeldByGroup();
    const std::vector<SymmetricSegment> still = ranks_[i].segments->segments();
    for (uint64_t number : empty[i]) {
      const SymmetricSegment& segment = pool.held_.at(number);
      const bool held = std::any_of(still.begin(), still.end(), [&](const SymmetricSegment& s) {
        return s.base == segment.base && s.window == segment.window;
      });
      if (!held) pool.Drop(number);
    }
  }
  if (!destroyed.ok()) {
    const absl::Status failed(destroyed.code(),
                              absl::StrCat("tidepool: giving back agreed segments failed: ",
                                           destroyed.message()));
    BreakAll(failed);
    return failed;
  }
  return absl::OkStatus();
}

}  // namespace tidepool
