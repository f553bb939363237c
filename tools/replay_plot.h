// An SVG plot of memory over a replay: live bytes (the trace's own, the floor) and each run's
// reserved bytes, against the event count, with axes in events and GiB, tick labels and a
// legend, as `tidepool replay --plot=out.svg` writes it and a browser shows it.
//
// Each series is drawn as a polyline and also carries its exact values in a `data-values`
// attribute ("event:bytes event:bytes ..."), so that a test (tests/trace/plot_test) can check
// the plot against the replay's figures rather than against pixels.
//
// A second run to compare with (PyTorch's, say) comes as a CSV of `event,reserved_bytes` lines
// (a header line is allowed), read by ReadReservedSeries.
#ifndef TIDEPOOL_TOOLS_REPLAY_PLOT_H_
#define TIDEPOOL_TOOLS_REPLAY_PLOT_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "tools/replay.h"

namespace tidepool {

struct PlotSeries {
  std::string label;
  std::string color;  // an SVG color
  bool dashed = false;
  std::vector<std::pair<int64_t, int64_t>> points;  // (event, bytes), in event order
};

// The series of one replay: its live bytes and tidepool's reserved bytes.
std::vector<PlotSeries> ReplaySeries(const ReplayResult& result);

// A compared run's reserved bytes from `path` (see the file comment), labelled `label`.
// NOT_FOUND for a missing file, INVALID_ARGUMENT naming the line for a malformed one.
absl::StatusOr<PlotSeries> ReadReservedSeries(const std::string& label, const std::string& path);

// The whole SVG document. `series` must hold at least one point.
std::string PlotSvg(const std::string& title, const std::vector<PlotSeries>& series);

}  // namespace tidepool

#endif  // TIDEPOOL_TOOLS_REPLAY_PLOT_H_
