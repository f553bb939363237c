// A communicator of threads for the symmetric pool's CPU tests: ranks are threads, and Exchange
// is a real rendezvous (each rank waits for all the others' proposals, round by round, under a
// timeout). A rank that does not come, or comes late, makes every waiting rank time out; the group
// is then aborted, and every later Exchange fails at once, as a real communicator that was
// aborted would. Tests make ranks diverge or stall simply by what each thread does.
//
// The exchange comes in halves too (rank_agreement.h): Start deposits a rank's proposal without
// waiting, Finish waits for its round. So one thread can drive several ranks (ExchangeTogether),
// and two threads that each drive some ranks of one group simulate two processes of several GPUs
// each.
#ifndef TIDEPOOL_TESTS_NCCL_THREAD_AGREEMENT_H_
#define TIDEPOOL_TESTS_NCCL_THREAD_AGREEMENT_H_

#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <map>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "absl/time/time.h"
#include "nccl/rank_agreement.h"

namespace tidepool {
namespace testing {

class ThreadGroup {
 public:
  explicit ThreadGroup(int ranks) : ranks_(ranks), deposits_(ranks) {}

  // Deposits `rank`'s proposal for the current round and returns that round's number, without
  // waiting. FAILED_PRECONDITION once the group was aborted.
  absl::StatusOr<uint64_t> Deposit(int rank, const Proposal& mine) {
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_) {
      return absl::FailedPreconditionError("the communicator was aborted after a timeout");
    }
    const uint64_t round = round_;
    deposits_[rank] = mine;
    if (++arrived_ == ranks_) {
      results_[round] = deposits_;
      arrived_ = 0;
      ++round_;
      changed_.notify_all();
    }
    return round;
  }

  // Every rank's proposals of `round`, once every rank deposited; DEADLINE_EXCEEDED (and the
  // group aborted) when that takes longer than `timeout`.
  absl::StatusOr<std::vector<Proposal>> Await(int rank, uint64_t round, absl::Duration timeout) {
    std::unique_lock<std::mutex> lock(mu_);
    const bool done = changed_.wait_for(lock, absl::ToChronoNanoseconds(timeout),
                                        [&] { return round_ > round || aborted_; });
    if (!done || round_ == round) {
      aborted_ = true;
      changed_.notify_all();
      return absl::DeadlineExceededError(absl::StrFormat(
          "rank %d waited %s for the others at round %u; the communicator is aborted", rank,
          absl::FormatDuration(timeout), round));
    }
    return results_.at(round);
  }

  absl::StatusOr<std::vector<Proposal>> Exchange(int rank, const Proposal& mine,
                                                 absl::Duration timeout) {
    absl::StatusOr<uint64_t> round = Deposit(rank, mine);
    if (!round.ok()) return round.status();
    return Await(rank, *round, timeout);
  }

  bool aborted() {
    std::lock_guard<std::mutex> lock(mu_);
    return aborted_;
  }

 private:
  const int ranks_;
  std::mutex mu_;
  std::condition_variable changed_;
  uint64_t round_ = 0;
  int arrived_ = 0;
  bool aborted_ = false;
  std::vector<Proposal> deposits_;
  std::map<uint64_t, std::vector<Proposal>> results_;
};

class ThreadAgreement : public RankAgreement {
 public:
  ThreadAgreement(ThreadGroup* group, int rank, int ranks)
      : group_(group), rank_(rank), ranks_(ranks) {}
  int rank() const override { return rank_; }
  int ranks() const override { return ranks_; }
  absl::StatusOr<std::vector<Proposal>> Exchange(const Proposal& mine,
                                                 absl::Duration timeout) override {
    return group_->Exchange(rank_, mine, timeout);
  }
  absl::Status Start(const Proposal& mine) override {
    if (started_) return absl::FailedPreconditionError("a Start not yet finished");
    absl::StatusOr<uint64_t> round = group_->Deposit(rank_, mine);
    if (!round.ok()) return round.status();
    round_ = *round;
    started_ = true;
    return absl::OkStatus();
  }
  absl::StatusOr<std::vector<Proposal>> Finish(absl::Duration timeout) override {
    if (!started_) return absl::FailedPreconditionError("Finish without a Start");
    started_ = false;
    return group_->Await(rank_, round_, timeout);
  }

 private:
  ThreadGroup* const group_;
  const int rank_;
  const int ranks_;
  bool started_ = false;
  uint64_t round_ = 0;
};

// Runs `body(rank)` on one thread per rank and waits for them all.
template <typename Body>
void OnEveryRank(int ranks, Body body) {
  std::vector<std::thread> threads;
  for (int rank = 0; rank < ranks; ++rank) threads.emplace_back([&body, rank] { body(rank); });
  for (std::thread& thread : threads) thread.join();
}

}  // namespace testing
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_NCCL_THREAD_AGREEMENT_H_
