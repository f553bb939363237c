// How a C entry point of libtidepool.so reports: a tidepool_status code, with the message kept
// for the calling thread (tidepool_last_error). Shared by the C API (tidepool.cc) and the other
// C entry points built into the same library (integrations/torch), so that one thread's last
// error is one place whichever call failed.
//
// Guarded runs one function's body, which returns an absl::Status, and turns the result into a
// code, catching every exception at the boundary: no C++ exception crosses into C.
#ifndef TIDEPOOL_INTEGRATIONS_C_API_C_STATUS_H_
#define TIDEPOOL_INTEGRATIONS_C_API_C_STATUS_H_

#include <exception>
#include <new>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "allocator/callback_segments.h"
#include "allocator/thread_exit_safe.h"
#include "integrations/c_api/tidepool.h"

namespace tidepool {
namespace c_api {

// The calling thread's last error message (tidepool_last_error). Not a thread_local string: a
// call that fails from a thread_local destructor at thread exit must still have somewhere to
// write (allocator/thread_exit_safe.h).
struct LastError {
  std::string message;
};
using LastErrors = ThreadExitSafe<LastError>;

inline tidepool_status CodeOf(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return TIDEPOOL_OK;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return TIDEPOOL_INVALID_ARGUMENT;
    case absl::StatusCode::kResourceExhausted:
      return TIDEPOOL_OUT_OF_MEMORY;
    case absl::StatusCode::kNotFound:
      return TIDEPOOL_NOT_FOUND;
    case absl::StatusCode::kFailedPrecondition:
    case absl::StatusCode::kAlreadyExists:
    case absl::StatusCode::kAborted:
      return TIDEPOOL_FAILED_PRECONDITION;
    case absl::StatusCode::kUnavailable:
      return TIDEPOOL_UNAVAILABLE;
    case absl::StatusCode::kDeadlineExceeded:
      return TIDEPOOL_DEADLINE_EXCEEDED;
    default:
      return TIDEPOOL_INTERNAL;
  }
}

// Keeps "<function>: <message>" for the calling thread and returns the status's code. The C++
// messages start with "tidepool: ", which the function's name makes redundant.
tidepool_status Fail(const char* function, const absl::Status& status);

// Runs one C function's body (which returns an absl::Status) and turns the result into a code,
// catching every exception at the boundary.
template <typename Body>
tidepool_status Guarded(const char* function, Body&& body) noexcept {
  try {
    if (CallbackSegments::CallingBack()) {
      return Fail(function, absl::FailedPreconditionError(
                                "called from inside a pool's segment callback, which tidepool "
                                "runs under its device lock; a callback must not call tidepool "
                                "(only tidepool_last_error, tidepool_status_name and "
                                "tidepool_api_version). Nothing was changed"));
    }
    const absl::Status status = body();
    return status.ok() ? TIDEPOOL_OK : Fail(function, status);
  } catch (const std::bad_alloc&) {
    return Fail(function, absl::ResourceExhaustedError("host memory ran out inside tidepool"));
  } catch (const std::exception& exception) {
    return Fail(function, absl::InternalError(absl::StrCat("exception: ", exception.what())));
  } catch (...) {
    return Fail(function, absl::InternalError("an exception of unknown type"));
  }
}

inline absl::Status NullArgument(const char* name) {
  return absl::InvalidArgumentError(absl::StrCat(name, " is NULL"));
}

}  // namespace c_api
}  // namespace tidepool

#endif  // TIDEPOOL_INTEGRATIONS_C_API_C_STATUS_H_
