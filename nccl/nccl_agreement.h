// The ranks' agreement (rank_agreement.h) over a real NCCL communicator: each rank's proposal is
// all-gathered on a stream of its own, and the host waits for the result while polling the
// communicator's asynchronous error, up to the timeout. A rank that never comes (or comes with a
// different program) would leave the all-gather waiting for ever; at the timeout the
// communicator is aborted (ncclCommAbort), which ends the half-done collective on this rank, and
// every later Exchange fails at once. The communicator may be blocking or not: the all-gather is
// enqueued, never waited on by NCCL itself.
//
// The device's context must be the one the communicator was made on (its primary context).
// Thread safety: Exchange calls are serialized by the symmetric pool that makes them.
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
  absl::StatusOr<std::vector<Proposal>> Exchange(const Proposal& mine,
                                                 absl::Duration timeout) override;

 private:
  NcclAgreement(const NcclLibrary* nccl, ncclComm_t comm, CudaDevice* device)
      : nccl_(nccl), comm_(comm), device_(device) {}

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
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_NCCL_AGREEMENT_H_
