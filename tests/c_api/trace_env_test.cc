// TIDEPOOL_TRACE through the C API: a trace that cannot be written stops the start with a message
// naming the variable; one that can records every allocate and free of the process, the ones
// routed to a pool included, in the CSV that `tidepool replay` reads.
#include <cstdlib>
#include <string>

#include "absl/strings/str_cat.h"
#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "runtime/global_runtime.h"
#include "runtime/runtime.h"
#include "trace/trace.h"

namespace tidepool {
namespace {

std::string Scratch(const std::string& name) {
  const char* folder = std::getenv("TEST_TMPDIR");
  return absl::StrCat(folder != nullptr ? folder : "/tmp", "/", name);
}

TEST_CASE("TIDEPOOL_TRACE records C API traffic, routed traffic included") {
  // A folder that does not exist: the start fails, saying why, and nothing is made.
  REQUIRE(setenv("TIDEPOOL_TRACE", "/nonexistent-folder/trace.csv", 1) == 0);
  REQUIRE(tidepool_init_simulated(1, size_t{256} << 20) == TIDEPOOL_INVALID_ARGUMENT);
  const std::string message = tidepool_last_error();
  INFO(message);
  CHECK(message.find("TIDEPOOL_TRACE=/nonexistent-folder/trace.csv") != std::string::npos);

  const std::string path = Scratch("c_api_trace.csv");
  REQUIRE(setenv("TIDEPOOL_TRACE", path.c_str(), 1) == 0);
  REQUIRE(tidepool_init_simulated(1, size_t{256} << 20) == TIDEPOOL_OK);
  void* plain = nullptr;
  REQUIRE(tidepool_malloc(&plain, 1000, 0, nullptr) == TIDEPOOL_OK);
  tidepool_pool_id pool;
  REQUIRE(tidepool_new_pool_id(&pool) == TIDEPOOL_OK);
  REQUIRE(tidepool_begin_allocate_current_thread_to_pool(0, pool) == TIDEPOOL_OK);
  void* routed = nullptr;
  REQUIRE(tidepool_malloc(&routed, 5000, 0, nullptr) == TIDEPOOL_OK);
  REQUIRE(tidepool_end_allocate_to_pool(0, pool) == TIDEPOOL_OK);
  void* refused = nullptr;
  CHECK(tidepool_malloc(&refused, 0, 0, nullptr) == TIDEPOOL_INVALID_ARGUMENT);
  REQUIRE(tidepool_free(plain) == TIDEPOOL_OK);
  REQUIRE(tidepool_free(routed) == TIDEPOOL_OK);
  CHECK(tidepool_free(routed) == TIDEPOOL_FAILED_PRECONDITION);  // not recorded twice
  REQUIRE(tidepool_release_pool(0, pool) == TIDEPOOL_OK);

  // The recorder buffers rows until exit; the process's runtime flushes them for reading here.
  absl::StatusOr<Runtime*> runtime = GlobalRuntime();
  REQUIRE(runtime.ok());
  REQUIRE((*runtime)->recorder() != nullptr);
  REQUIRE((*runtime)->recorder()->Flush().ok());
  absl::StatusOr<Trace> trace = ReadTrace(path);
  REQUIRE(trace.ok());
  CHECK(trace->skipped_failures == 1);  // the 0-byte malloc
  REQUIRE(trace->events.size() == 4);
  CHECK(trace->events[0].action == TraceAction::kAllocate);
  CHECK(trace->events[0].pointer == reinterpret_cast<uintptr_t>(plain));
  CHECK(trace->events[0].size == 1000);
  CHECK(trace->events[1].action == TraceAction::kAllocate);
  CHECK(trace->events[1].pointer == reinterpret_cast<uintptr_t>(routed));
  CHECK(trace->events[1].size == 5000);
  CHECK(trace->events[2].action == TraceAction::kFree);
  CHECK(trace->events[2].pointer == reinterpret_cast<uintptr_t>(plain));
  CHECK(trace->events[3].action == TraceAction::kFree);
  CHECK(trace->events[3].pointer == reinterpret_cast<uintptr_t>(routed));
  CHECK(trace->events[3].size == 5000);
}

}  // namespace
}  // namespace tidepool
