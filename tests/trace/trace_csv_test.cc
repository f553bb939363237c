// The PyTorch anchor's trace reader (bench/trace_csv.h, standard C++ only) against tidepool's own
// (trace/trace.h): on every bundled trace they must read the same events, in the same order, from
// the same lines, or the anchor would replay another workload than `tidepool replay`. Also the
// rows the anchor's reader refuses or skips.
#include <catch2/catch.hpp>

#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "bench/trace_csv.h"
#include "trace/trace.h"

namespace tidepool {
namespace {

TEST_CASE("the anchor's reader and tidepool's read the bundled traces alike") {
  const char* const traces[] = {"traces/gpt2_train.csv.gz", "traces/gpt2_varlen_infer.csv.gz",
                                "traces/resnet18_prefetch_train.csv.gz",
                                "traces/resnet50_train.csv.gz",
                                "traces/varlen_small_infer.csv.gz",
                                "traces/generate_tokens.csv.gz",
                                "traces/checkpoint_amp_train.csv.gz"};
  for (const char* path : traces) {
    INFO(path);
    absl::StatusOr<Trace> ours = ReadTrace(path);
    REQUIRE(ours.ok());
    std::vector<bench::LoopEvent> theirs;
    std::string error;
    REQUIRE(bench::ReadTraceCsv(path, &theirs, &error));
    REQUIRE(theirs.size() == ours->events.size());
    size_t mismatches = 0;
    for (size_t i = 0; i < theirs.size(); ++i) {
      const TraceEvent& a = ours->events[i];
      const bench::LoopEvent& b = theirs[i];
      mismatches += (a.action == TraceAction::kAllocate) != b.allocate || a.pointer != b.pointer ||
                    a.size != b.size || a.stream != b.stream || a.line != b.line;
    }
    CHECK(mismatches == 0);
  }
}

TEST_CASE("the anchor's reader skips refused allocations and refuses malformed rows") {
  bench::LoopEvent event;
  bool skip = false;
  REQUIRE(bench::ParseTraceRow("0,12,allocate failure,0x0,4096,0x0", &event, &skip));
  CHECK(skip);
  REQUIRE(bench::ParseTraceRow("3,0,deallocate,0x7f00,512,0x1a", &event, &skip));
  CHECK_FALSE(skip);
  CHECK_FALSE(event.allocate);
  CHECK(event.pointer == 0x7f00);
  CHECK(event.size == 512);
  CHECK(event.stream == 0x1a);
  CHECK_FALSE(bench::ParseTraceRow("0,0,allocate,0x10,12", &event, &skip));         // 5 fields
  CHECK_FALSE(bench::ParseTraceRow("0,0,resize,0x10,12,0x0", &event, &skip));       // an action
  CHECK_FALSE(bench::ParseTraceRow("0,0,allocate,zz,12,0x0", &event, &skip));       // a pointer
  CHECK_FALSE(bench::ParseTraceRow("0,0,allocate,0x10,12kb,0x0", &event, &skip));   // a size
  std::vector<bench::LoopEvent> events;
  std::string error;
  CHECK_FALSE(bench::ReadTraceCsv("no/such/trace.csv", &events, &error));
  CHECK(error.find("cannot open") != std::string::npos);
}

}  // namespace
}  // namespace tidepool
