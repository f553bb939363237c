// Allocation traces in the replay CSV format, read and written.
//
// A trace is what an allocator was asked to do, one row per event, so that a workload recorded
// anywhere (PyTorch's allocator history, RMM's logging adaptor, tidepool's own recorder) replays
// here against any allocator configuration. The format is RMM's:
//
//   Thread,Time,Action,Pointer,Size,Stream
//   0,0,allocate,0x7f4613e00000,37632,0x0
//   0,375,free,0x7f4613e00000,37632,0x0
//
// `Action` is `allocate` or `free` (`deallocate` is read as `free`); RMM also writes
// `allocate failure` rows, which are skipped on reading because nothing was handed out. `Pointer`
// and `Stream` are hex, `Thread` and `Size` decimal. `Time` is microseconds, either as an integer
// or as RMM's clock time `HH:MM:SS.ffffff` or seconds with a fraction; on reading every form
// becomes microseconds since the first event. Files may be gzip-compressed (read either way; a
// writer compresses when the path ends in `.gz`).
#ifndef TIDEPOOL_TRACE_TRACE_H_
#define TIDEPOOL_TRACE_TRACE_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"
#include "allocator/mutex.h"

// zlib's stream type (zlib.h: `typedef struct gzFile_s* gzFile`), declared here so that users of
// this header do not include zlib.
struct gzFile_s;

namespace tidepool {

enum class TraceAction {
  kAllocate,
  kFree,
  // An allocation the allocator refused. Written by recorders, skipped by ReadTrace.
  kAllocateFailure,
};

// One row of a trace.
struct TraceEvent {
  // The thread that made the call, as the recorder named it (a small index, or a system thread
  // id in RMM's logs).
  uint64_t thread = 0;
  // Microseconds since the first event of the trace.
  int64_t time_us = 0;
  TraceAction action = TraceAction::kAllocate;
  // The pointer handed out (allocate) or given back (free), in the recorded process.
  uintptr_t pointer = 0;
  size_t size = 0;
  // The recorded process's name for the stream: a handle or a unique id.
  uint64_t stream = 0;
  // Where the row sits in the file it was read from (1 = the header), for error messages;
  // 0 for events that did not come from a file.
  int64_t line = 0;
};

struct Trace {
  // Allocates and frees, in file order. Never holds kAllocateFailure.
  std::vector<TraceEvent> events;
  // `allocate failure` rows that were skipped.
  int64_t skipped_failures = 0;
};

// Parses trace text (the whole CSV, header included). `source` names the text in error
// messages, which read "source:line: what is wrong".
absl::StatusOr<Trace> ParseTrace(absl::string_view text, absl::string_view source);

// Reads a trace file, plain or gzip-compressed. NOT_FOUND when it cannot be opened,
// INVALID_ARGUMENT (with the line) when a row is malformed.
absl::StatusOr<Trace> ReadTrace(const std::string& path);

// Formats one event as a CSV row (no newline), as TraceWriter writes it.
std::string FormatTraceRow(const TraceEvent& event);

// Appends events to a trace file, from any number of threads. Rows appear in the order the
// Append calls took the writer's lock, which is the order a replay must follow.
class TraceWriter {
 public:
  // Creates (or truncates) `path` and writes the header. The file is gzip-compressed when the
  // path ends in ".gz", plain CSV otherwise.
  static absl::StatusOr<std::unique_ptr<TraceWriter>> Open(const std::string& path);
  // Closes the file; an error at this point is lost, so call Close() to see it.
  ~TraceWriter();
  TraceWriter(const TraceWriter&) = delete;
  TraceWriter& operator=(const TraceWriter&) = delete;

  absl::Status Append(const TraceEvent& event);
  // Pushes buffered rows to the file, so that a reader sees them while the writer lives.
  absl::Status Flush();
  // Flushes and closes. Later calls to Append fail with FAILED_PRECONDITION.
  absl::Status Close();

  const std::string& path() const { return path_; }

 private:
  TraceWriter(std::string path, gzFile_s* gz_file);

  const std::string path_;
  Mutex mu_;
  // One zlib stream writes both forms: compressed, or "transparent" for plain CSV. nullptr once
  // closed.
  gzFile_s* gz_file_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tidepool

#endif  // TIDEPOOL_TRACE_TRACE_H_
