// Trace replay (see replay.h): the replay loop, its clean-up, and the table it prints.
#include "tools/replay.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <memory>
#include <sstream>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/string_view.h"
#include "absl/strings/strip.h"
#include "allocator/caching_allocator.h"

namespace tidepool {
namespace {

using Clock = std::chrono::steady_clock;

// A trace pointer's replayed block: tidepool's pointer and the size the trace asked for.
struct ReplayedBlock {
  void* block = nullptr;
  size_t requested_bytes = 0;
  int64_t allocated_at_line = 0;
};

// Nearest-rank percentile (`fraction` in (0, 1]) of unsorted samples; sorts them.
int64_t Percentile(std::vector<int64_t>& samples, double fraction) {
  if (samples.empty()) return 0;
  const size_t rank = static_cast<size_t>(std::ceil(fraction * samples.size()));
  const size_t index = std::min(samples.size() - 1, rank == 0 ? 0 : rank - 1);
  std::nth_element(samples.begin(), samples.begin() + index, samples.end());
  return samples[index];
}

LatencySummary Summarize(std::vector<int64_t>& samples_ns) {
  LatencySummary summary;
  summary.p50_ns = Percentile(samples_ns, 0.50);
  summary.p99_ns = Percentile(samples_ns, 0.99);
  return summary;
}

// Keeps the first error of several steps: a clean-up failure must not hide the failure that
// caused the clean-up.
void KeepFirstError(absl::Status* first, absl::Status next) {
  if (first->ok()) *first = std::move(next);
}

// Adds where in the trace a failure happened.
absl::Status AtLine(const TraceEvent& event, absl::string_view what, const absl::Status& status) {
  return absl::Status(status.code(), absl::StrCat("trace line ", event.line, " (", what, "): ",
                                                  status.message()));
}

// The replay proper: runs every event through `allocator`, filling `result` and `live`.
absl::Status ReplayEvents(const Trace& trace, CachingAllocator& allocator,
                          const absl::flat_hash_map<uint64_t, Stream>& streams,
                          absl::flat_hash_map<uintptr_t, ReplayedBlock>& live,
                          ReplayResult& result) {
  std::vector<int64_t> malloc_ns;
  std::vector<int64_t> free_ns;
  malloc_ns.reserve(trace.events.size());
  free_ns.reserve(trace.events.size());
  int64_t live_bytes = 0;
  const int64_t events = static_cast<int64_t>(trace.events.size());
  const int64_t bucket =
      std::max<int64_t>(1, (events + ReplayResult::kTimelinePoints - 1) /
                               ReplayResult::kTimelinePoints);
  int64_t index = 0;
  int64_t bucket_live = 0;
  for (const TraceEvent& event : trace.events) {
    if (event.action == TraceAction::kAllocate) {
      const std::string what =
          absl::StrFormat("allocate %u bytes as 0x%x on stream 0x%x", event.size, event.pointer,
                          event.stream);
      auto existing = live.find(event.pointer);
      if (existing != live.end()) {
        return AtLine(event, what,
                      absl::InvalidArgumentError(absl::StrCat(
                          "the trace allocates a pointer that is still live (allocated at line ",
                          existing->second.allocated_at_line, ")")));
      }
      const Stream stream = streams.at(event.stream);
      const Clock::time_point start = Clock::now();
      absl::StatusOr<void*> block = allocator.Allocate(event.size, stream);
      const Clock::time_point end = Clock::now();
      if (!block.ok()) return AtLine(event, what, block.status());
      malloc_ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count());
      live[event.pointer] = ReplayedBlock{*block, event.size, event.line};
      live_bytes += static_cast<int64_t>(event.size);
      result.peak_live_bytes = std::max(result.peak_live_bytes, live_bytes);
      ++result.allocations;
    } else {
      const std::string what = absl::StrFormat("free 0x%x", event.pointer);
      auto freed = live.find(event.pointer);
      if (freed == live.end()) {
        return AtLine(event, what,
                      absl::InvalidArgumentError(
                          "the trace frees a pointer it never allocated, or already freed"));
      }
      const Clock::time_point start = Clock::now();
      absl::Status status = allocator.Free(freed->second.block);
      const Clock::time_point end = Clock::now();
      if (!status.ok()) return AtLine(event, what, status);
      free_ns.push_back(std::chrono::duration_cast<std::chrono::nanoseconds>(end - start).count());
      live_bytes -= static_cast<int64_t>(freed->second.requested_bytes);
      live.erase(freed);
      ++result.frees;
    }
    bucket_live = std::max(bucket_live, live_bytes);
    ++index;
    if (index % bucket == 0 || index == events) {
      result.timeline.push_back(
          TimelinePoint{index, bucket_live, allocator.GetStats().reserved_bytes.current});
      bucket_live = live_bytes;
    }
  }
  result.stats = allocator.GetStats();
  result.malloc_latency = Summarize(malloc_ns);
  result.free_latency = Summarize(free_ns);
  return absl::OkStatus();
}

// Reads `"key": number` from a small flat JSON object. The reference files are written by a
// script with one number per key, so a full JSON parser would add a dependency for nothing.
std::optional<double> ReadJsonNumber(const std::string& path, absl::string_view key) {
  std::ifstream file(path);
  if (!file) return std::nullopt;
  std::stringstream contents;
  contents << file.rdbuf();
  const std::string text = contents.str();
  const std::string quoted_key = absl::StrCat("\"", key, "\"");
  const size_t key_at = text.find(quoted_key);
  if (key_at == std::string::npos) return std::nullopt;
  size_t at = text.find_first_not_of(" \t\r\n", key_at + quoted_key.size());
  if (at == std::string::npos || text[at] != ':') return std::nullopt;
  const char* number_start = text.c_str() + at + 1;
  char* number_end = nullptr;
  const double value = std::strtod(number_start, &number_end);
  if (number_end == number_start) return std::nullopt;
  return value;
}

std::string FormatRatio(const std::optional<double>& ratio) {
  return ratio.has_value() ? absl::StrFormat("%.3f", *ratio) : "—";
}

std::string FormatGiB(int64_t bytes) {
  return absl::StrFormat("%.2f GiB", static_cast<double>(bytes) / (int64_t{1} << 30));
}

// The trace path without its ".csv" / ".csv.gz" ending, folders kept.
std::string TraceStem(const std::string& trace_path) {
  absl::string_view stem = trace_path;
  absl::ConsumeSuffix(&stem, ".gz");
  absl::ConsumeSuffix(&stem, ".csv");
  return std::string(stem);
}

}  // namespace

double ReplayResult::reserved_over_live() const {
  if (peak_live_bytes == 0) return 0.0;
  return static_cast<double>(stats.reserved_bytes.peak) / static_cast<double>(peak_live_bytes);
}

absl::StatusOr<ReplayResult> ReplayTrace(const Trace& trace, GraphDevice* device,
                                         const Config& config) {
  absl::StatusOr<std::unique_ptr<CachingAllocator>> allocator =
      CachingAllocator::Create(device, config);
  if (!allocator.ok()) return allocator.status();

  absl::Status status;
  ReplayResult result;
  absl::flat_hash_map<uint64_t, Stream> streams;
  std::vector<Stream> created_streams;
  for (const TraceEvent& event : trace.events) {
    if (streams.contains(event.stream)) continue;
    absl::StatusOr<Stream> stream = device->CreateStream();
    if (!stream.ok()) {
      status = stream.status();
      break;
    }
    streams[event.stream] = *stream;
    created_streams.push_back(*stream);
  }
  result.streams = static_cast<int64_t>(created_streams.size());

  absl::flat_hash_map<uintptr_t, ReplayedBlock> live;
  if (status.ok()) status = ReplayEvents(trace, **allocator, streams, live, result);

  // Clean-up, whether or not the replay got to the end.
  for (const auto& [trace_pointer, replayed] : live) {
    KeepFirstError(&status, (*allocator)->Free(replayed.block));
  }
  KeepFirstError(&status, (*allocator)->EmptyCache());
  // The allocator goes before the streams: it may still know them by handle.
  allocator->reset();
  for (Stream stream : created_streams) {
    KeepFirstError(&status, device->SynchronizeStream(stream));
    KeepFirstError(&status, device->DestroyStream(stream));
  }
  if (!status.ok()) return status;
  return result;
}

std::string TraceName(const std::string& trace_path) {
  std::string stem = TraceStem(trace_path);
  const size_t slash = stem.find_last_of('/');
  return slash == std::string::npos ? stem : stem.substr(slash + 1);
}

PytorchReference ReadPytorchReference(const std::string& trace_path) {
  constexpr absl::string_view kRatioKey = "torch_reserved_over_trace_peak";
  const std::string stem = TraceStem(trace_path);
  PytorchReference reference;
  reference.reserved_over_live = ReadJsonNumber(stem + ".json", kRatioKey);
  reference.expandable_reserved_over_live = ReadJsonNumber(stem + ".expandable.json", kRatioKey);
  return reference;
}

std::string FormatReplayTable(const std::vector<ReplayRow>& rows) {
  std::string table =
      "| trace | allocations | peak live | peak reserved | reserved / live | PyTorch "
      "| PyTorch expandable | device allocations | malloc p50 | malloc p99 | free p50 "
      "| free p99 |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const ReplayRow& row : rows) {
    const ReplayResult& result = row.result;
    absl::StrAppendFormat(
        &table, "| %s | %d | %s | %s | %.3f | %s | %s | %d | %d ns | %d ns | %d ns | %d ns |\n",
        row.trace_name, result.allocations, FormatGiB(result.peak_live_bytes),
        FormatGiB(result.stats.reserved_bytes.peak), result.reserved_over_live(),
        FormatRatio(row.pytorch.reserved_over_live),
        FormatRatio(row.pytorch.expandable_reserved_over_live), result.stats.device_allocations,
        result.malloc_latency.p50_ns, result.malloc_latency.p99_ns, result.free_latency.p50_ns,
        result.free_latency.p99_ns);
  }
  return table;
}

}  // namespace tidepool
