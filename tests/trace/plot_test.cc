// The replay's timeline and its SVG plot (tools/replay.h, tools/replay_plot.h), checked against
// the replay's own figures rather than pixels: a trace whose live bytes rise to a known peak and
// fall is replayed on a simulated device; the timeline's live bytes must reach that peak exactly
// and its reserved bytes must never be below live nor above the run's reserved peak; the SVG
// must carry every series with its exact values (data-values), axes with units and a legend;
// and a compared run read from CSV must appear as it was written, while a malformed CSV is
// refused naming its line.
#include <algorithm>
#include <cstdint>
#include <fstream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "catch2/catch.hpp"
#include "tests/trace/trace_test_util.h"
#include "tools/replay.h"
#include "tools/replay_plot.h"
#include "trace/trace.h"

namespace tidepool {
namespace {

using testing::ScratchPath;

constexpr int64_t kMiB = int64_t{1} << 20;

// 3,000 allocations of 1 MiB (live rises to 3,000 MiB), then all freed: 6,000 events.
Trace RisingThenFalling() {
  Trace trace;
  for (int i = 0; i < 3000; ++i) {
    TraceEvent event;
    event.action = TraceAction::kAllocate;
    event.pointer = 0x100000 + static_cast<uintptr_t>(i) * 0x200000;
    event.size = kMiB;
    event.line = i + 2;
    trace.events.push_back(event);
  }
  for (int i = 0; i < 3000; ++i) {
    TraceEvent event;
    event.action = TraceAction::kFree;
    event.pointer = 0x100000 + static_cast<uintptr_t>(i) * 0x200000;
    event.line = 3002 + i;
    trace.events.push_back(event);
  }
  return trace;
}

// The values of the series named `label` in `svg`'s data-values attribute.
std::vector<std::pair<int64_t, int64_t>> ValuesOf(const std::string& svg, const std::string& label) {
  const std::string key = "data-series=\"" + label + "\" data-values=\"";
  const size_t at = svg.find(key);
  REQUIRE(at != std::string::npos);
  const size_t start = at + key.size();
  const std::string values = svg.substr(start, svg.find('"', start) - start);
  std::vector<std::pair<int64_t, int64_t>> points;
  for (absl::string_view pair : absl::StrSplit(values, ' ')) {
    std::vector<absl::string_view> parts = absl::StrSplit(pair, ':');
    REQUIRE(parts.size() == 2);
    int64_t event = 0;
    int64_t bytes = 0;
    REQUIRE(absl::SimpleAtoi(parts[0], &event));
    REQUIRE(absl::SimpleAtoi(parts[1], &bytes));
    points.emplace_back(event, bytes);
  }
  return points;
}

TEST_CASE("the timeline and its plot carry the replay's figures") {
  SimulatedDevice device;
  const Trace trace = RisingThenFalling();
  absl::StatusOr<ReplayResult> result = ReplayTrace(trace, &device, Config{});
  REQUIRE(result.ok());
  REQUIRE(result->peak_live_bytes == 3000 * kMiB);
  // At most kTimelinePoints points, the last at the last event.
  REQUIRE(!result->timeline.empty());
  CHECK(static_cast<int64_t>(result->timeline.size()) <= ReplayResult::kTimelinePoints);
  CHECK(result->timeline.back().event == 6000);
  int64_t max_live = 0;
  int64_t max_reserved = 0;
  int64_t previous_event = 0;
  for (const TimelinePoint& point : result->timeline) {
    CHECK(point.event > previous_event);
    previous_event = point.event;
    max_live = std::max(max_live, point.live_bytes);
    max_reserved = std::max(max_reserved, point.reserved_bytes);
  }
  CHECK(max_live == result->peak_live_bytes);  // each bucket keeps its highest live bytes
  CHECK(max_reserved >= max_live);
  CHECK(max_reserved <= result->stats.reserved_bytes.peak);

  const std::string svg = PlotSvg("rising then falling", ReplaySeries(*result));
  CHECK(svg.rfind("<svg xmlns=\"http://www.w3.org/2000/svg\"", 0) == 0);
  CHECK(svg.find("</svg>") != std::string::npos);
  CHECK(svg.find("memory (GiB)") != std::string::npos);
  CHECK(svg.find("events (allocations and frees)") != std::string::npos);
  CHECK(svg.find(">rising then falling<") != std::string::npos);
  const auto live = ValuesOf(svg, "live (the trace)");
  const auto reserved = ValuesOf(svg, "tidepool reserved");
  REQUIRE(live.size() == result->timeline.size());
  REQUIRE(reserved.size() == result->timeline.size());
  for (size_t i = 0; i < live.size(); ++i) {
    CHECK(live[i].first == result->timeline[i].event);
    CHECK(live[i].second == result->timeline[i].live_bytes);
    CHECK(reserved[i].second == result->timeline[i].reserved_bytes);
  }
  // The legend names both series; the y axis reaches the peak (3,000 MiB is 2.93 GiB: ticks to 3).
  CHECK(svg.find(">live (the trace)</text>") != std::string::npos);
  CHECK(svg.find(">tidepool reserved</text>") != std::string::npos);
  CHECK(svg.find(">3</text>") != std::string::npos);
}

TEST_CASE("a compared run comes from its CSV as written; a malformed one is refused") {
  const std::string good = ScratchPath("compare.csv");
  {
    std::ofstream out(good);
    out << "event,reserved_bytes\n1,0\n3000,3300000000\n6000,3300000000\n";
  }
  absl::StatusOr<PlotSeries> compared = ReadReservedSeries("PyTorch", good);
  REQUIRE(compared.ok());
  const std::string svg = PlotSvg("t", {*compared});
  const auto values = ValuesOf(svg, "PyTorch");
  REQUIRE(values.size() == 3);
  CHECK(values[1] == std::make_pair(int64_t{3000}, int64_t{3300000000}));

  const std::string bad = ScratchPath("bad.csv");
  {
    std::ofstream out(bad);
    out << "event,reserved_bytes\n1,0\n2;12\n";
  }
  absl::StatusOr<PlotSeries> refused = ReadReservedSeries("x", bad);
  CHECK(absl::IsInvalidArgument(refused.status()));
  CHECK(refused.status().message().find(":3:") != std::string::npos);
  CHECK(absl::IsNotFound(ReadReservedSeries("x", ScratchPath("missing.csv")).status()));
}

}  // namespace
}  // namespace tidepool
