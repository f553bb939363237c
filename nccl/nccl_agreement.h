// The ranks' agreement (rank_agreement.h) over a real NCCL communicator: each rank's proposal is
// all-gathered on a stream of its own, and the host waits for the result while polling the
// communicator's asynchronous error, up to the timeout. A rank that never comes (or comes with a
// different program) would leave the all-gather waiting for ever; at the timeout the
// communicator is aborted (ncclCommAbort), which ends the half-done collective on this rank, and
// every later call fails at once. The communicator may be blocking or not (non-blocking is what
// a timeout needs: a blocking one may wait inside NCCL while it connects to its peers); the
// all-gather is enqueued, never waited on by NCCL itself.
//
// Split for one thread driving several GPUs (rank_agreement.h, ONE THREAD, SEVERAL RANKS): Start
// copies the proposal to the device and enqueues the all-gather (inside the caller's
// ncclGroupStart/End when several local ranks exchange together; GroupStart and GroupEnd are
// those calls); Finish waits until the launch is done (a non-blocking communicator answers
// ncclInProgress until then), records an event after it, and polls the event and the
// communicator's error until the timeout. Every local rank's Finish aborts its own communicator
// at the deadline, so a stalled peer makes every local rank fail within the one timeout.
//
// The device's context must be the one the communicator was made on (its primary context); Start
// and Finish make it current. Thread safety: calls are serialized by the symmetric pool (or the
// group of pools) that makes them.
#ifndef TIDEPOOL_NCCL_NCCL_AGREEMENT_H_
#define TIDEPOOL_NCCL_NCCL_AGREEMENT_H_

#include <nccl.h>

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "allocator/cuda_device.h"
#include "nccl/nccl_library.h"
#include "nccl/rank_agreement.h"

namespace tidepool {

class NcclAgreement : public RankAgreement {
 public:
  // `nccl`, `comm` and `device` must outlive the agreement.
  static absl::StatusOr<std::unique_ptr<NcclAgreement>> Create(const NcclLibrary* nccl,
                                                               ncclComm_t comm,
                                                               CudaDevice* device);
  ~NcclAgreement() override;
  NcclAgreement(const NcclAgreement&) = delete;
  NcclAgreement& operator=(const NcclAgreement&) = delete;

  int rank() const override { return rank_; }
  int ranks() const override { return ranks_; }
  // Exchange is RankAgreement's: Start, then Finish.
  absl::Status Start(const Proposal& mine) override;
  absl::StatusOr<std::vector<Proposal>> Finish(absl::Duration timeout) override;
  absl::Status GroupStart() override;
  absl::Status GroupEnd() override;

 private:
  NcclAgreement(const NcclLibrary* nccl, ncclComm_t comm, CudaDevice* device)
      : nccl_(nccl), comm_(comm), device_(device) {}
  // Aborts the communicator: every later call fails at once.
  void Abort();

  const NcclLibrary* const nccl_;
  const ncclComm_t comm_;
  CudaDevice* const device_;
  int rank_ = 0;
  int ranks_ = 0;
  Stream stream_ = nullptr;
  Event done_ = nullptr;
  CUdeviceptr send_ = 0;  // one proposal
  CUdeviceptr recv_ = 0;  // one per rank
  bool aborted_ = false;
  bool started_ = false;  // a Start not yet finished
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_NCCL_AGREEMENT_H_
