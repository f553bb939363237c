// The ranks' agreement over NCCL: see nccl_agreement.h.
#include "nccl/nccl_agreement.h"

#include <chrono>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tidepool {
namespace {

constexpr size_t kWords = sizeof(Proposal) / sizeof(uint64_t);
static_assert(sizeof(Proposal) == kWords * sizeof(uint64_t), "a proposal is whole words");

}  // namespace

absl::StatusOr<std::unique_ptr<NcclAgreement>> NcclAgreement::Create(const NcclLibrary* nccl,
                                                                     ncclComm_t comm,
                                                                     CudaDevice* device) {
  std::unique_ptr<NcclAgreement> agreement(new NcclAgreement(nccl, comm, device));
  if (absl::Status s = nccl->Check(nccl->ncclCommCount(comm, &agreement->ranks_), "ncclCommCount");
      !s.ok()) {
    return s;
  }
  if (absl::Status s =
          nccl->Check(nccl->ncclCommUserRank(comm, &agreement->rank_), "ncclCommUserRank");
      !s.ok()) {
    return s;
  }
  if (absl::Status s = device->MakeCurrent(); !s.ok()) return s;
  const CudaDriver& driver = device->driver();
  absl::StatusOr<Stream> stream = device->CreateStream();
  if (!stream.ok()) return stream.status();
  agreement->stream_ = *stream;
  absl::StatusOr<Event> done = device->CreateEvent();
  if (!done.ok()) return done.status();
  agreement->done_ = *done;
  if (absl::Status s = driver.Check(driver.cuMemAlloc(&agreement->send_, sizeof(Proposal)),
                                    "cuMemAlloc (agreement)");
      !s.ok()) {
    return s;
  }
  if (absl::Status s = driver.Check(
          driver.cuMemAlloc(&agreement->recv_, sizeof(Proposal) * agreement->ranks_),
          "cuMemAlloc (agreement)");
      !s.ok()) {
    return s;
  }
  return agreement;
}

NcclAgreement::~NcclAgreement() {
  if (device_->MakeCurrent().ok()) {
    const CudaDriver& driver = device_->driver();
    if (send_ != 0) driver.cuMemFree(send_);
    if (recv_ != 0) driver.cuMemFree(recv_);
  }
  if (done_ != nullptr) device_->DestroyEvent(done_).IgnoreError();
  if (stream_ != nullptr) device_->DestroyStream(stream_).IgnoreError();
}

void NcclAgreement::Abort() {
  nccl_->ncclCommAbort(comm_);
  aborted_ = true;
  started_ = false;
}

absl::Status NcclAgreement::GroupStart() {
  return nccl_->Check(nccl_->ncclGroupStart(), "ncclGroupStart (agreement)");
}

absl::Status NcclAgreement::GroupEnd() {
  // A group of non-blocking communicators answers ncclInProgress while it launches; each
  // Finish waits for its own communicator.
  const ncclResult_t result = nccl_->ncclGroupEnd();
  if (result == ncclInProgress) return absl::OkStatus();
  return nccl_->Check(result, "ncclGroupEnd (agreement)");
}

absl::Status NcclAgreement::Start(const Proposal& mine) {
  if (aborted_) {
    return absl::FailedPreconditionError(
        "the communicator was aborted when an earlier agreement timed out");
  }
  if (started_) return absl::FailedPreconditionError("tidepool: a Start not yet finished");
  if (absl::Status s = device_->MakeCurrent(); !s.ok()) return s;
  const CudaDriver& driver = device_->driver();
  if (absl::Status s = driver.Check(driver.cuMemcpyHtoD(send_, &mine, sizeof(Proposal)),
                                    "cuMemcpyHtoD (agreement)");
      !s.ok()) {
    return s;
  }
  const ncclResult_t result =
      nccl_->ncclAllGather(reinterpret_cast<const void*>(send_), reinterpret_cast<void*>(recv_),
                           kWords, ncclUint64, comm_, static_cast<cudaStream_t>(stream_));
  // ncclInProgress: a non-blocking communicator is still launching it; Finish waits for that.
  if (result != ncclInProgress) {
    if (absl::Status s = nccl_->Check(result, "ncclAllGather (agreement)"); !s.ok()) return s;
  }
  started_ = true;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<Proposal>> NcclAgreement::Finish(absl::Duration timeout) {
  if (aborted_) {
    return absl::FailedPreconditionError(
        "the communicator was aborted when an earlier agreement timed out");
  }
  if (!started_) return absl::FailedPreconditionError("tidepool: Finish without a Start");
  const auto deadline = std::chrono::steady_clock::now() + absl::ToChronoNanoseconds(timeout);
  if (absl::Status s = device_->MakeCurrent(); !s.ok()) {
    Abort();
    return s;
  }
  // The event is recorded once the communicator has launched the all-gather (ncclSuccess rather
  // than ncclInProgress), so that it follows the all-gather on the stream.
  bool recorded = false;
  for (;;) {
    ncclResult_t async = ncclSuccess;
    nccl_->ncclCommGetAsyncError(comm_, &async);
    if (async != ncclSuccess && async != ncclInProgress) {
      Abort();
      return absl::UnavailableError(absl::StrCat(
          "the communicator failed during the agreement: ",
          nccl_->Check(async, "ncclCommGetAsyncError").message()));
    }
    if (!recorded && async == ncclSuccess) {
      if (absl::Status s = device_->RecordEvent(done_, stream_); !s.ok()) {
        Abort();
        return s;
      }
      recorded = true;
    }
    if (recorded) {
      absl::StatusOr<bool> done = device_->QueryEvent(done_);
      if (!done.ok()) {
        Abort();
        return done.status();
      }
      if (*done) break;
    }
    if (std::chrono::steady_clock::now() > deadline) {
      Abort();
      return absl::DeadlineExceededError(absl::StrFormat(
          "rank %d of %d waited %s for the other ranks; the communicator is aborted", rank_,
          ranks_, absl::FormatDuration(timeout)));
    }
    std::this_thread::sleep_for(std::chrono::microseconds(50));
  }
  started_ = false;
  std::vector<Proposal> all(ranks_);
  const CudaDriver& driver = device_->driver();
  if (absl::Status s = driver.Check(
          driver.cuMemcpyDtoH(all.data(), recv_, sizeof(Proposal) * ranks_),
          "cuMemcpyDtoH (agreement)");
      !s.ok()) {
    return s;
  }
  return all;
}

}  // namespace tidepool
