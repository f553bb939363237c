// Trace replay: drives a CachingAllocator through a recorded workload and measures what it held.
//
// This is how tidepool's fragmentation is compared with PyTorch's on the same workload: the
// traces in traces/ were recorded from PyTorch's allocator on an H200, each with PyTorch's own
// peak reserved bytes beside it, and replaying one here yields tidepool's peak reserved bytes for
// the exact same sequence of requests. Replay honours the trace's Stream column (one created
// stream per distinct trace stream, the trace's 0x0 included), maps each trace pointer to the
// block tidepool handed out for it, and frees it where the trace frees it. Every call is timed.
//
// Used by the `tidepool replay` command (tools/tidepool_main.cc) and by GPU tests.
#ifndef TIDEPOOL_TOOLS_REPLAY_H_
#define TIDEPOOL_TOOLS_REPLAY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "allocator/config.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "allocator/stats.h"
#include "bench/replay_loop.h"
#include "trace/trace.h"

namespace tidepool {

// Percentiles and total of the wall time of one kind of call, in nanoseconds: the loop's own.
using LatencySummary = bench::LoopLatency;

// Live and reserved bytes over a replay, one point per bucket of consecutive events: the most
// bytes live in the bucket (exact: the trace's own sizes) and tidepool's reserved bytes at its
// end (the allocator's statistics, read between events, outside the timed calls).
// The replay loop's own point (bench/replay_loop.h), which every allocator's replay shares.
using TimelinePoint = bench::LoopPoint;

struct ReplayResult {
  int64_t allocations = 0;
  int64_t frees = 0;
  // Distinct streams in the trace (each replayed on a stream of its own).
  int64_t streams = 0;
  // The highest total of requested bytes live at once, from the trace alone: the floor that
  // any allocator's reserved bytes are measured against.
  int64_t peak_live_bytes = 0;
  // tidepool's statistics after the last event, before the blocks the trace leaves live are
  // freed. Its peaks are the run's peaks.
  AllocatorStats stats;
  LatencySummary malloc_latency;
  LatencySummary free_latency;
  // At most kTimelinePoints points, evenly spaced over the events.
  static constexpr int64_t kTimelinePoints = 1000;
  std::vector<TimelinePoint> timeline;

  // Peak reserved bytes over peak live bytes: 1.0 is the floor, lower is better.
  double reserved_over_live() const;
  // Time inside the allocator's calls (mallocs and frees) over the calls: the replay's wall time
  // per operation, as the PyTorch anchor (bench/pytorch_anchor.cc) prints it.
  double wall_per_op_ns() const;
};

// Replays `trace` on `device` with a new CachingAllocator configured by `config`. The device is a
// GraphDevice (allocator/graph_device.h) because replay makes a stream per trace stream, which
// the allocator itself never does. Afterwards
// (also after a failure) frees the blocks the trace left live, empties the cache, and destroys
// the streams it created, so a real device is left as it was found. Fails on the first
// allocator error, or on a trace that frees a pointer it never allocated or allocates one that
// is still live, naming the trace line.
absl::StatusOr<ReplayResult> ReplayTrace(const Trace& trace, GraphDevice* device,
                                         const Config& config);

// PyTorch's figures for the run a trace was recorded from, read from the JSON files beside it.
struct PytorchReference {
  // `torch_reserved_over_trace_peak` from TRACE.json (default settings) and
  // TRACE.expandable.json (expandable_segments:True); empty when the file or key is missing.
  std::optional<double> reserved_over_live;
  std::optional<double> expandable_reserved_over_live;
};

// The trace's name without folders and without ".csv" / ".csv.gz": "traces/gpt2_train.csv.gz"
// gives "gpt2_train".
std::string TraceName(const std::string& trace_path);

// Reads the JSON files beside `trace_path` ("traces/gpt2_train.csv.gz" looks for
// traces/gpt2_train.json and traces/gpt2_train.expandable.json).
PytorchReference ReadPytorchReference(const std::string& trace_path);

// One row of the replay table.
struct ReplayRow {
  std::string trace_name;
  ReplayResult result;
  PytorchReference pytorch;
};

// The replay table, in markdown.
std::string FormatReplayTable(const std::vector<ReplayRow>& rows);

}  // namespace tidepool

#endif  // TIDEPOOL_TOOLS_REPLAY_H_
