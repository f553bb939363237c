// Trace replay (see replay.h): tidepool through the shared loop (bench/replay_loop.h), the
// clean-up after it, and the table it prints.
#include "tools/replay.h"

#include <algorithm>
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
#include "bench/replay_loop.h"

namespace tidepool {
namespace {


// Keeps the first error of several steps: a clean-up failure must not hide the failure that
// caused the clean-up.
void KeepFirstError(absl::Status* first, absl::Status next) {
  if (first->ok()) *first = std::move(next);
}

// tidepool as bench/replay_loop.h drives it: a CachingAllocator and the stream made for each
// trace stream.
class LoopAllocator {
 public:
  LoopAllocator(CachingAllocator& allocator, const absl::flat_hash_map<uint64_t, Stream>& streams)
      : allocator_(allocator), streams_(streams) {}

  bool Allocate(size_t bytes, uint64_t trace_stream, void** block, std::string* error) {
    absl::StatusOr<void*> allocated = allocator_.Allocate(bytes, streams_.at(trace_stream));
    if (!allocated.ok()) {
      *error = allocated.status().ToString();
      failure_ = allocated.status();
      return false;
    }
    *block = *allocated;
    return true;
  }
  bool Free(void* block, std::string* error) {
    absl::Status freed = allocator_.Free(block);
    if (!freed.ok()) {
      *error = freed.ToString();
      failure_ = freed;
    }
    return freed.ok();
  }
  int64_t ReservedBytes() { return allocator_.GetStats().reserved_bytes.current; }
  // The code of the allocator's failure, if it was the allocator that failed.
  absl::StatusCode failure_code() const {
    return failure_.ok() ? absl::StatusCode::kInvalidArgument : failure_.code();
  }

 private:
  CachingAllocator& allocator_;
  const absl::flat_hash_map<uint64_t, Stream>& streams_;
  absl::Status failure_;
};

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

double ReplayResult::wall_per_op_ns() const {
  return bench::WallPerOperationNs(malloc_latency, free_latency, allocations + frees);
}

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

  bench::LoopResult loop;
  if (status.ok()) {
    std::vector<bench::LoopEvent> events;
    events.reserve(trace.events.size());
    for (const TraceEvent& event : trace.events) {
      events.push_back(bench::LoopEvent{event.action == TraceAction::kAllocate, event.pointer,
                                        event.size, event.stream, event.line});
    }
    LoopAllocator adapter(**allocator, streams);
    std::string error;
    if (!bench::ReplayLoop(events, adapter, &loop, &error)) {
      status = absl::Status(adapter.failure_code(), error);
    }
    result.allocations = loop.allocations;
    result.frees = loop.frees;
    result.peak_live_bytes = loop.peak_live_bytes;
    result.malloc_latency = loop.malloc_latency;
    result.free_latency = loop.free_latency;
    result.timeline = std::move(loop.timeline);
    result.stats = (*allocator)->GetStats();
  }

  // Clean-up, whether or not the replay got to the end.
  for (const auto& [trace_pointer, replayed] : loop.live) {
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
      "| PyTorch expandable | device allocations | wall per op | malloc p50 | malloc p99 "
      "| malloc max | free p50 | free p99 |\n"
      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n";
  for (const ReplayRow& row : rows) {
    const ReplayResult& result = row.result;
    absl::StrAppendFormat(
        &table,
        "| %s | %d | %s | %s | %.3f | %s | %s | %d | %.0f ns | %d ns | %d ns | %d ns | %d ns "
        "| %d ns |\n",
        row.trace_name, result.allocations, FormatGiB(result.peak_live_bytes),
        FormatGiB(result.stats.reserved_bytes.peak), result.reserved_over_live(),
        FormatRatio(row.pytorch.reserved_over_live),
        FormatRatio(row.pytorch.expandable_reserved_over_live), result.stats.device_allocations,
        result.wall_per_op_ns(), result.malloc_latency.p50_ns, result.malloc_latency.p99_ns, result.malloc_latency.max_ns,
        result.free_latency.p50_ns, result.free_latency.p99_ns);
  }
  return table;
}

}  // namespace tidepool
