// NCCL loaded at run time: see nccl_library.h for what is resolved and why.
#include "nccl/nccl_library.h"

#include <dlfcn.h>

#include <cstdlib>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tidepool {
namespace {

// Stores the library's `name` in `slot`, typed as nccl.h declares it, or names what is missing.
template <typename Fn>
absl::Status Resolve(void* handle, const std::string& path, const char* name, Fn* slot) {
  void* symbol = dlsym(handle, name);
  if (symbol == nullptr) {
    return absl::UnavailableError(absl::StrCat("NCCL: ", path, " has no ", name,
                                               " (is it NCCL? tidepool needs 2.27 or newer)"));
  }
  *slot = reinterpret_cast<Fn>(symbol);
  return absl::OkStatus();
}

#define TIDEPOOL_NCCL_RESOLVE(entry_point)                                                     \
  do {                                                                                         \
    if (absl::Status s = Resolve(handle, path, #entry_point, &library->entry_point); !s.ok()) { \
      return s;                                                                                \
    }                                                                                          \
  } while (false)

}  // namespace

std::string NcclLibrary::VersionText(int version) {
  // NCCL_VERSION(X, Y, Z) is X*1000 + Y*100 + Z up to 2.8, X*10000 + Y*100 + Z since 2.9.
  if (version < 10000) {
    return absl::StrFormat("%d.%d.%d", version / 1000, (version % 1000) / 100, version % 100);
  }
  return absl::StrFormat("%d.%d.%d", version / 10000, (version % 10000) / 100, version % 100);
}

absl::StatusOr<const NcclLibrary*> NcclLibrary::Get() {
  // Opened once (a function-local static) and never closed: communicators may outlive anything.
  static const auto* const loaded = [] {
    const char* from_environment = std::getenv("TIDEPOOL_NCCL_LIBRARY");
    const std::string path = from_environment != nullptr && from_environment[0] != '\0'
                                 ? from_environment
                                 : kDefaultLibrary;
    absl::StatusOr<std::unique_ptr<NcclLibrary>> opened = Open(path);
    return opened.ok()
               ? new absl::StatusOr<const NcclLibrary*>(opened->release())
               : new absl::StatusOr<const NcclLibrary*>(opened.status());
  }();
  return *loaded;
}

absl::StatusOr<std::unique_ptr<NcclLibrary>> NcclLibrary::Open(const std::string& path) {
  // RTLD_NOLOAD first: a process that already has NCCL (PyTorch's) must use that one, so a
  // library of the same name already loaded wins over a search.
  void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD);
  if (handle == nullptr) handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    return absl::UnavailableError(absl::StrCat(
        "NCCL: ", why != nullptr ? why : absl::StrCat("cannot load ", path),
        " (set TIDEPOOL_NCCL_LIBRARY to the libnccl.so.2 that made your communicators; with "
        "PyTorch it is nvidia/nccl/lib/libnccl.so.2 in the Python site-packages)"));
  }
  // The handle stays open whatever happens below: closing a library whose constructors ran is
  // not worth the risk, and Get() keeps its answer.
  std::unique_ptr<NcclLibrary> library(new NcclLibrary());
  library->path_ = path;
  TIDEPOOL_NCCL_RESOLVE(ncclGetVersion);
  if (ncclResult_t result = library->ncclGetVersion(&library->version_); result != ncclSuccess) {
    return absl::UnavailableError(
        absl::StrCat("NCCL: ncclGetVersion failed in ", path, " (ncclResult_t ", result, ")"));
  }
  if (library->version_ < kMinVersion) {
    return absl::FailedPreconditionError(absl::StrCat(
        "NCCL: ", path, " is NCCL ", VersionText(library->version_),
        "; symmetric windows (ncclCommWindowRegister) need NCCL ", VersionText(kMinVersion),
        " or newer"));
  }
  TIDEPOOL_NCCL_RESOLVE(ncclGetErrorString);
  TIDEPOOL_NCCL_RESOLVE(ncclMemAlloc);
  TIDEPOOL_NCCL_RESOLVE(ncclMemFree);
  TIDEPOOL_NCCL_RESOLVE(ncclCommWindowRegister);
  TIDEPOOL_NCCL_RESOLVE(ncclCommWindowDeregister);
  TIDEPOOL_NCCL_RESOLVE(ncclCommCount);
  TIDEPOOL_NCCL_RESOLVE(ncclCommUserRank);
  TIDEPOOL_NCCL_RESOLVE(ncclCommGetAsyncError);
  TIDEPOOL_NCCL_RESOLVE(ncclCommAbort);
  TIDEPOOL_NCCL_RESOLVE(ncclAllGather);
  TIDEPOOL_NCCL_RESOLVE(ncclGroupStart);
  TIDEPOOL_NCCL_RESOLVE(ncclGroupEnd);
  library->get_last_error_ =
      reinterpret_cast<const char* (*)(ncclComm_t)>(dlsym(handle, "ncclGetLastError"));
  return library;
}

#undef TIDEPOOL_NCCL_RESOLVE

absl::Status NcclLibrary::Check(ncclResult_t result, absl::string_view what) const {
  if (result == ncclSuccess) return absl::OkStatus();
  const char* words = ncclGetErrorString != nullptr ? ncclGetErrorString(result) : nullptr;
  std::string message = absl::StrCat("NCCL: ", what, ": ",
                                     words != nullptr ? words : "unknown error", " (ncclResult_t ",
                                     static_cast<int>(result), ")");
  if (get_last_error_ != nullptr) {
    const char* detail = get_last_error_(nullptr);
    if (detail != nullptr && detail[0] != '\0') absl::StrAppend(&message, ": ", detail);
  }
  switch (result) {
    case ncclInvalidArgument:
    case ncclInvalidUsage:
      return absl::InvalidArgumentError(message);
    case ncclRemoteError:
      return absl::UnavailableError(message);
    default:
      return absl::InternalError(message);
  }
}

}  // namespace tidepool
