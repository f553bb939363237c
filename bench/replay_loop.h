// The trace replay loop, one for every allocator measured on a trace: `tidepool replay`
// (tools/replay.cc) runs tidepool through it, and bench/pytorch_anchor.cc runs PyTorch's caching
// allocator through the same code, so that their figures differ by the allocator alone.
//
// The loop walks a trace's events in order. Each allocation is timed (steady clock around the one
// call), mapped from the trace's pointer to the block handed out, and counted into the live
// bytes (the trace's own sizes: the floor any allocator's reserved bytes are measured against);
// each free is timed and gives its block back. Between events, outside the timed calls, the
// allocator's reserved bytes are read once per bucket of events for a timeline of at most
// kTimelinePoints points. A trace that allocates a pointer still live, or frees one it never
// allocated, stops the loop with the trace line named.
//
// Standard C++ only: the PyTorch anchor is compiled on the GPU host with g++ and torch's headers,
// without Bazel or Abseil.
//
// The allocator type provides:
//   bool Allocate(size_t bytes, uint64_t trace_stream, void** block, std::string* error);
//   bool Free(void* block, std::string* error);
//   int64_t ReservedBytes();
#ifndef TIDEPOOL_BENCH_REPLAY_LOOP_H_
#define TIDEPOOL_BENCH_REPLAY_LOOP_H_

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

namespace tidepool {
namespace bench {

// One event, as the loop needs it.
struct LoopEvent {
  bool allocate = true;
  uintptr_t pointer = 0;
  size_t size = 0;
  uint64_t stream = 0;
  int64_t line = 0;  // where it sits in its file (1 = the header), for messages
};

// Wall time of one kind of call, in nanoseconds.
struct LoopLatency {
  int64_t p50_ns = 0;
  int64_t p99_ns = 0;
  int64_t max_ns = 0;
  int64_t total_ns = 0;
  int64_t max_line = 0;  // the trace line of the slowest call (the first, on a tie)
};

struct LoopPoint {
  int64_t event = 0;           // the bucket's last event, counted from 1
  int64_t live_bytes = 0;      // the most bytes live in the bucket (the trace's own sizes)
  int64_t reserved_bytes = 0;  // the allocator's, at the bucket's end
};

// A live trace pointer's block.
struct LoopBlock {
  void* block = nullptr;
  size_t requested_bytes = 0;
  int64_t allocated_at_line = 0;
};

struct LoopResult {
  int64_t allocations = 0;
  int64_t frees = 0;
  int64_t peak_live_bytes = 0;
  LoopLatency malloc_latency;
  LoopLatency free_latency;
  static constexpr int64_t kTimelinePoints = 1000;
  std::vector<LoopPoint> timeline;
  // The blocks still live when the loop stopped (at the end, or at an error), by trace pointer:
  // the caller frees them.
  std::unordered_map<uintptr_t, LoopBlock> live;
};

// The time spent inside the allocator's calls, mallocs and frees, per call: a replay's wall time
// per operation (the loop's own bookkeeping between calls is not counted).
inline double WallPerOperationNs(const LoopLatency& malloc_latency,
                                 const LoopLatency& free_latency, int64_t operations) {
  if (operations == 0) return 0.0;
  return static_cast<double>(malloc_latency.total_ns + free_latency.total_ns) /
         static_cast<double>(operations);
}

// Nearest-rank percentile (`fraction` in (0, 1]) of unsorted samples; reorders them.
inline int64_t Percentile(std::vector<int64_t>& samples, double fraction) {
  if (samples.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(fraction * samples.size()));
  const size_t index = std::min(samples.size() - 1, rank == 0 ? 0 : rank - 1);
  std::nth_element(samples.begin(), samples.begin() + index, samples.end());
  return samples[index];
}

// `lines[i]` is the trace line of `samples_ns[i]`.
inline LoopLatency Summarize(std::vector<int64_t>& samples_ns, const std::vector<int64_t>& lines) {
  LoopLatency latency;
  for (size_t i = 0; i < samples_ns.size(); ++i) {
    latency.total_ns += samples_ns[i];
    if (samples_ns[i] > latency.max_ns) {
      latency.max_ns = samples_ns[i];
      latency.max_line = lines[i];
    }
  }
  latency.p50_ns = Percentile(samples_ns, 0.50);
  latency.p99_ns = Percentile(samples_ns, 0.99);
  return latency;
}

// Runs `events` through `allocator` (see the file comment). Returns false, with `error` saying
// which trace line and why, at the first event that fails; `result` then holds what was done.
template <typename Allocator>
bool ReplayLoop(const std::vector<LoopEvent>& events, Allocator& allocator, LoopResult* result,
                std::string* error) {
  using Clock = std::chrono::steady_clock;
  auto nanoseconds = [](Clock::time_point start, Clock::time_point end) {
    return static_cast<int64_t>(
        std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count());
  };
  auto at_line = [](const LoopEvent& event, const std::string& what, const std::string& why) {
    return "trace line " + std::to_string(event.line) + " (" + what + "): " + why;
  };
  std::vector<int64_t> malloc_ns;
  std::vector<int64_t> free_ns;
  std::vector<int64_t> malloc_lines;
  std::vector<int64_t> free_lines;
  malloc_ns.reserve(events.size());
  free_ns.reserve(events.size());
  malloc_lines.reserve(events.size());
  free_lines.reserve(events.size());
  const int64_t count = static_cast<int64_t>(events.size());
  const int64_t bucket = std::max<int64_t>(
      1, (count + LoopResult::kTimelinePoints - 1) / LoopResult::kTimelinePoints);
  int64_t live_bytes = 0;
  int64_t bucket_live = 0;
  int64_t index = 0;
  bool ok = true;
  for (const LoopEvent& event : events) {
    std::string why;
    if (event.allocate) {
      const std::string what = "allocate " + std::to_string(event.size) + " bytes";
      auto existing = result->live.find(event.pointer);
      if (existing != result->live.end()) {
        *error = at_line(event, what,
                         "the trace allocates a pointer that is still live (allocated at line " +
                             std::to_string(existing->second.allocated_at_line) + ")");
        ok = false;
        break;
      }
      void* block = nullptr;
      const Clock::time_point start = Clock::now();
      const bool allocated = allocator.Allocate(event.size, event.stream, &block, &why);
      const Clock::time_point end = Clock::now();
      if (!allocated) {
        *error = at_line(event, what, why);
        ok = false;
        break;
      }
      malloc_ns.push_back(nanoseconds(start, end));
      malloc_lines.push_back(event.line);
      result->live[event.pointer] = LoopBlock{block, event.size, event.line};
      live_bytes += static_cast<int64_t>(event.size);
      result->peak_live_bytes = std::max(result->peak_live_bytes, live_bytes);
      ++result->allocations;
    } else {
      const std::string what = "free";
      auto freed = result->live.find(event.pointer);
      if (freed == result->live.end()) {
        *error = at_line(event, what,
                         "the trace frees a pointer it never allocated, or already freed");
        ok = false;
        break;
      }
      const Clock::time_point start = Clock::now();
      const bool done = allocator.Free(freed->second.block, &why);
      const Clock::time_point end = Clock::now();
      if (!done) {
        *error = at_line(event, what, why);
        ok = false;
        break;
      }
      free_ns.push_back(nanoseconds(start, end));
      free_lines.push_back(event.line);
      live_bytes -= static_cast<int64_t>(freed->second.requested_bytes);
      result->live.erase(freed);
      ++result->frees;
    }
    bucket_live = std::max(bucket_live, live_bytes);
    ++index;
    if (index % bucket == 0 || index == count) {
      result->timeline.push_back(LoopPoint{index, bucket_live, allocator.ReservedBytes()});
      bucket_live = live_bytes;
    }
  }
  result->malloc_latency = Summarize(malloc_ns, malloc_lines);
  result->free_latency = Summarize(free_ns, free_lines);
  return ok;
}

}  // namespace bench
}  // namespace tidepool

#endif  // TIDEPOOL_BENCH_REPLAY_LOOP_H_
