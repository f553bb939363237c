// NCCL, loaded at run time: the only door from tidepool to NCCL.
//
// tidepool never links against NCCL. `NcclLibrary::Get()` opens the library named by the
// environment variable TIDEPOOL_NCCL_LIBRARY, else `libnccl.so.2` by the loader's usual search,
// checks its version and resolves every entry point tidepool calls into this table, once. Why:
//   * a process must use the NCCL that made its communicators, and on the GPU host that NCCL
//     lives in the Python site-packages (nvidia/nccl/lib/libnccl.so.2), not on the loader's
//     path: a communicator handed to tidepool by PyTorch or sglang names that library;
//   * libtidepool.so.1 must load and run its other paths on machines without NCCL;
//   * symmetric windows (ncclCommWindowRegister, NCCL_WIN_COLL_SYMMETRIC) need NCCL 2.27 or newer,
//     and an older library is refused here, in words, rather than failing on a missing symbol.
// Each member is typed as nccl.h (2.28.9, from the CUDA toolkit on the build machine) declares
// the function of that name.
//
// Thread safety: Get() may be called from any thread; the table is immutable once returned.
#ifndef TIDEPOOL_NCCL_NCCL_LIBRARY_H_
#define TIDEPOOL_NCCL_NCCL_LIBRARY_H_

#include <nccl.h>

#include <memory>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace tidepool {

class NcclLibrary {
 public:
  // The oldest NCCL with symmetric windows: 2.27.0, as ncclGetVersion encodes it.
  static constexpr int kMinVersion = 22700;
  // What Get() opens when TIDEPOOL_NCCL_LIBRARY is unset or empty.
  static constexpr char kDefaultLibrary[] = "libnccl.so.2";

  // The process's NCCL, opened on first use; thread safe, and the answer (a failure too) is
  // kept. UNAVAILABLE when the library cannot be opened (with the loader's reason and where
  // tidepool looked), FAILED_PRECONDITION when it is older than 2.27 (naming its version), and
  // UNAVAILABLE naming an entry point it lacks.
  static absl::StatusOr<const NcclLibrary*> Get();
  // Opens the library at `path` (a soname or a file) with the same checks. For tests, which load
  // several fakes into one process; Get() is what everything else uses.
  static absl::StatusOr<std::unique_ptr<NcclLibrary>> Open(const std::string& path);

  NcclLibrary(const NcclLibrary&) = delete;
  NcclLibrary& operator=(const NcclLibrary&) = delete;

  // ncclGetVersion's code (22809 is 2.28.9) and its text ("2.28.9").
  int version() const { return version_; }
  static std::string VersionText(int version);
  const std::string& path() const { return path_; }

  // OK for ncclSuccess; otherwise an error naming `what` and NCCL's own words for the result
  // (and ncclGetLastError's detail when the library has it). INVALID_ARGUMENT for
  // ncclInvalidArgument and ncclInvalidUsage, UNAVAILABLE for a remote error (a peer is gone),
  // INTERNAL for the rest.
  absl::Status Check(ncclResult_t result, absl::string_view what) const;

  // --- Entry points -----------------------------------------------------------------------------
  decltype(&::ncclGetVersion) ncclGetVersion = nullptr;
  decltype(&::ncclGetErrorString) ncclGetErrorString = nullptr;
  // Memory and windows.
  decltype(&::ncclMemAlloc) ncclMemAlloc = nullptr;
  decltype(&::ncclMemFree) ncclMemFree = nullptr;
  decltype(&::ncclCommWindowRegister) ncclCommWindowRegister = nullptr;
  decltype(&::ncclCommWindowDeregister) ncclCommWindowDeregister = nullptr;
  // The communicator: its size and rank, its asynchronous errors, and its end.
  decltype(&::ncclCommCount) ncclCommCount = nullptr;
  decltype(&::ncclCommUserRank) ncclCommUserRank = nullptr;
  decltype(&::ncclCommGetAsyncError) ncclCommGetAsyncError = nullptr;
  decltype(&::ncclCommAbort) ncclCommAbort = nullptr;
  // Collectives and groups (the ranks' agreement on each growth; one thread driving several
  // GPUs registers inside a group).
  decltype(&::ncclAllGather) ncclAllGather = nullptr;
  decltype(&::ncclGroupStart) ncclGroupStart = nullptr;
  decltype(&::ncclGroupEnd) ncclGroupEnd = nullptr;

 private:
  NcclLibrary() = default;

  std::string path_;
  int version_ = 0;
  // ncclGetLastError, where the library has it (2.13 and later): the detail behind a failure.
  const char* (*get_last_error_)(ncclComm_t) = nullptr;
};

}  // namespace tidepool

#endif  // TIDEPOOL_NCCL_NCCL_LIBRARY_H_
