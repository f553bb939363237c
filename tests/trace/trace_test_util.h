// Helpers shared by the trace tests (tests/trace/): where a test may write its scratch files.
#ifndef TIDEPOOL_TESTS_TRACE_TRACE_TEST_UTIL_H_
#define TIDEPOOL_TESTS_TRACE_TRACE_TEST_UTIL_H_

#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"

namespace tidepool {
namespace testing {

// A path inside Bazel's per-test scratch folder (TEST_TMPDIR; /tmp outside Bazel).
inline std::string ScratchPath(const std::string& name) {
  const char* folder = std::getenv("TEST_TMPDIR");
  return absl::StrCat(folder != nullptr ? folder : "/tmp", "/", name);
}

}  // namespace testing
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_TRACE_TRACE_TEST_UTIL_H_
