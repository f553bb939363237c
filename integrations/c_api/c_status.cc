// A C entry point's failure, kept for the calling thread: see c_status.h.
#include "integrations/c_api/c_status.h"

#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"

namespace tidepool {
namespace c_api {

// The C++ messages start with "tidepool: ", which the function's name makes redundant.
tidepool_status Fail(const char* function, const absl::Status& status) {
  absl::string_view message = status.message();
  absl::ConsumePrefix(&message, "tidepool: ");
  LastErrors::Get().message = absl::StrCat(function, ": ", message);
  return CodeOf(status);
}

}  // namespace c_api
}  // namespace tidepool
