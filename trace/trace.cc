// Reading and writing allocation traces (see trace.h for the format).
//
// Reading goes through zlib's gz* stream, which decompresses gzip and passes plain text through
// unchanged, so one path serves both. The whole file is read into memory and parsed line by
// line: the bundled traces are a few megabytes uncompressed, and a parse error can then name its
// line exactly.
#include "trace/trace.h"

#include <zlib.h>

#include <cerrno>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"

namespace tidepool {
namespace {

constexpr absl::string_view kHeader = "Thread,Time,Action,Pointer,Size,Stream";
constexpr int kColumns = 6;
constexpr int64_t kMicrosPerSecond = 1000000;
constexpr int64_t kMicrosPerDay = 24 * 3600 * kMicrosPerSecond;

// Builds "source:line: message" as INVALID_ARGUMENT.
absl::Status RowError(absl::string_view source, int64_t line, absl::string_view message) {
  return absl::InvalidArgumentError(absl::StrCat(source, ":", line, ": ", message));
}

// Parses up to six digits of a fraction of a second ("25" = 250000 µs). Digits past the sixth
// are below a microsecond and dropped.
bool ParseMicrosFraction(absl::string_view digits, int64_t* micros) {
  if (digits.empty()) return false;
  int64_t value = 0;
  int64_t scale = kMicrosPerSecond;
  for (char c : digits) {
    if (!absl::ascii_isdigit(static_cast<unsigned char>(c))) return false;
    if (scale > 1) {
      scale /= 10;
      value += (c - '0') * scale;
    }
  }
  *micros = value;
  return true;
}

// Parses "HH:MM:SS[.ffffff]" (RMM's clock time) into microseconds since midnight.
bool ParseClockTime(absl::string_view text, int64_t* micros) {
  std::vector<absl::string_view> parts = absl::StrSplit(text, ':');
  if (parts.size() != 3) return false;
  int64_t hours = 0;
  int64_t minutes = 0;
  if (!absl::SimpleAtoi(parts[0], &hours) || !absl::SimpleAtoi(parts[1], &minutes)) return false;
  absl::string_view seconds_text = parts[2];
  int64_t fraction = 0;
  const size_t dot = seconds_text.find('.');
  if (dot != absl::string_view::npos) {
    if (!ParseMicrosFraction(seconds_text.substr(dot + 1), &fraction)) return false;
    seconds_text = seconds_text.substr(0, dot);
  }
  int64_t seconds = 0;
  if (!absl::SimpleAtoi(seconds_text, &seconds)) return false;
  if (hours < 0 || hours > 23 || minutes < 0 || minutes > 59 || seconds < 0 || seconds > 60) {
    return false;
  }
  *micros = ((hours * 60 + minutes) * 60 + seconds) * kMicrosPerSecond + fraction;
  return true;
}

// Parses "SECONDS.ffffff" (seconds since some epoch, with a fraction) into microseconds.
bool ParseDecimalSeconds(absl::string_view text, int64_t* micros) {
  const size_t dot = text.find('.');
  int64_t seconds = 0;
  int64_t fraction = 0;
  if (!absl::SimpleAtoi(text.substr(0, dot), &seconds) || seconds < 0) return false;
  if (!ParseMicrosFraction(text.substr(dot + 1), &fraction)) return false;
  *micros = seconds * kMicrosPerSecond + fraction;
  return true;
}

enum class TimeForm { kMicros, kClock, kDecimalSeconds };

bool ParseTime(absl::string_view text, TimeForm* form, int64_t* micros) {
  if (absl::StrContains(text, ':')) {
    *form = TimeForm::kClock;
    return ParseClockTime(text, micros);
  }
  if (absl::StrContains(text, '.')) {
    *form = TimeForm::kDecimalSeconds;
    return ParseDecimalSeconds(text, micros);
  }
  *form = TimeForm::kMicros;
  return absl::SimpleAtoi(text, micros) && *micros >= 0;
}

bool ParseAction(absl::string_view text, TraceAction* action) {
  if (text == "allocate") {
    *action = TraceAction::kAllocate;
  } else if (text == "free" || text == "deallocate") {
    *action = TraceAction::kFree;
  } else if (text == "allocate failure") {
    *action = TraceAction::kAllocateFailure;
  } else {
    return false;
  }
  return true;
}

absl::string_view ActionName(TraceAction action) {
  switch (action) {
    case TraceAction::kAllocate:
      return "allocate";
    case TraceAction::kFree:
      return "free";
    case TraceAction::kAllocateFailure:
      return "allocate failure";
  }
  return "?";
}

}  // namespace

absl::StatusOr<Trace> ParseTrace(absl::string_view text, absl::string_view source) {
  Trace trace;
  int64_t line_number = 0;
  bool seen_header = false;
  // Clock times restart at midnight; a jump back of more than half a day is read as the next
  // day rather than as time running backwards (multi-threaded logs are only nearly ordered).
  int64_t clock_day_offset = 0;
  int64_t previous_clock = -1;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    if (!seen_header) {
      if (line != kHeader) {
        return RowError(source, line_number,
                        absl::StrCat("expected the header \"", kHeader, "\", found \"", line,
                                     "\""));
      }
      seen_header = true;
      continue;
    }
    std::vector<absl::string_view> fields = absl::StrSplit(line, ',');
    if (fields.size() != kColumns) {
      return RowError(source, line_number,
                      absl::StrCat("expected ", kColumns, " comma-separated fields, found ",
                                   fields.size(), ": \"", line, "\""));
    }
    for (absl::string_view& field : fields) field = absl::StripAsciiWhitespace(field);

    TraceEvent event;
    event.line = line_number;
    if (!ParseAction(fields[2], &event.action)) {
      return RowError(source, line_number,
                      absl::StrCat("Action \"", fields[2],
                                   "\" is not allocate, free, deallocate or allocate failure"));
    }
    if (event.action == TraceAction::kAllocateFailure) {
      ++trace.skipped_failures;
      continue;
    }
    if (!absl::SimpleAtoi(fields[0], &event.thread)) {
      return RowError(source, line_number,
                      absl::StrCat("Thread \"", fields[0], "\" is not a decimal integer"));
    }
    TimeForm form;
    if (!ParseTime(fields[1], &form, &event.time_us)) {
      return RowError(source, line_number,
                      absl::StrCat("Time \"", fields[1],
                                   "\" is neither microseconds, HH:MM:SS.ffffff nor "
                                   "seconds.ffffff"));
    }
    if (form == TimeForm::kClock) {
      if (previous_clock >= 0 && event.time_us + kMicrosPerDay / 2 < previous_clock) {
        clock_day_offset += kMicrosPerDay;
      }
      previous_clock = event.time_us;
      event.time_us += clock_day_offset;
    }
    if (!absl::SimpleHexAtoi(fields[3], &event.pointer)) {
      return RowError(source, line_number,
                      absl::StrCat("Pointer \"", fields[3], "\" is not hex (like 0x7f4613e00000)"));
    }
    if (!absl::SimpleAtoi(fields[4], &event.size)) {
      return RowError(source, line_number,
                      absl::StrCat("Size \"", fields[4], "\" is not a decimal byte count"));
    }
    if (!absl::SimpleHexAtoi(fields[5], &event.stream)) {
      return RowError(source, line_number,
                      absl::StrCat("Stream \"", fields[5], "\" is not hex (like 0x0)"));
    }
    trace.events.push_back(event);
  }
  if (!seen_header) {
    return absl::InvalidArgumentError(
        absl::StrCat(source, ": empty trace (no \"", kHeader, "\" header)"));
  }
  if (!trace.events.empty()) {
    const int64_t first_time = trace.events.front().time_us;
    for (TraceEvent& event : trace.events) event.time_us -= first_time;
  }
  return trace;
}

absl::StatusOr<Trace> ReadTrace(const std::string& path) {
  gzFile file = gzopen(path.c_str(), "rb");
  if (file == nullptr) {
    return absl::NotFoundError(
        absl::StrCat("cannot open trace ", path, ": ", std::strerror(errno)));
  }
  gzbuffer(file, 1 << 20);
  std::string text;
  char chunk[1 << 16];
  int bytes_read;
  while ((bytes_read = gzread(file, chunk, sizeof(chunk))) > 0) {
    text.append(chunk, static_cast<size_t>(bytes_read));
  }
  if (bytes_read < 0) {
    int zlib_error = Z_OK;
    const std::string message = gzerror(file, &zlib_error);
    gzclose(file);
    return absl::DataLossError(absl::StrCat("cannot read trace ", path, ": ", message));
  }
  gzclose(file);
  return ParseTrace(text, path);
}

std::string FormatTraceRow(const TraceEvent& event) {
  return absl::StrFormat("%u,%d,%s,0x%x,%u,0x%x", event.thread, event.time_us,
                         ActionName(event.action), event.pointer, event.size, event.stream);
}

absl::StatusOr<std::unique_ptr<TraceWriter>> TraceWriter::Open(const std::string& path) {
  // "T" asks zlib for transparent (uncompressed) writing.
  const char* mode = absl::EndsWith(path, ".gz") ? "wb" : "wbT";
  gzFile file = gzopen(path.c_str(), mode);
  if (file == nullptr) {
    return absl::PermissionDeniedError(
        absl::StrCat("cannot create trace ", path, ": ", std::strerror(errno)));
  }
  const std::string header = absl::StrCat(kHeader, "\n");
  if (gzwrite(file, header.data(), static_cast<unsigned>(header.size())) !=
      static_cast<int>(header.size())) {
    int zlib_error = Z_OK;
    const std::string message = gzerror(file, &zlib_error);
    gzclose(file);
    return absl::DataLossError(absl::StrCat("cannot write trace ", path, ": ", message));
  }
  return std::unique_ptr<TraceWriter>(new TraceWriter(path, file));
}

TraceWriter::TraceWriter(std::string path, gzFile_s* gz_file)
    : path_(std::move(path)), gz_file_(gz_file) {}

TraceWriter::~TraceWriter() { Close().IgnoreError(); }

absl::Status TraceWriter::Append(const TraceEvent& event) {
  const std::string row = absl::StrCat(FormatTraceRow(event), "\n");
  MutexLock lock(&mu_);
  if (gz_file_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("trace ", path_, " is closed"));
  }
  if (gzwrite(gz_file_, row.data(), static_cast<unsigned>(row.size())) !=
      static_cast<int>(row.size())) {
    int zlib_error = Z_OK;
    return absl::DataLossError(
        absl::StrCat("cannot write trace ", path_, ": ", gzerror(gz_file_, &zlib_error)));
  }
  return absl::OkStatus();
}

absl::Status TraceWriter::Flush() {
  MutexLock lock(&mu_);
  if (gz_file_ == nullptr) {
    return absl::FailedPreconditionError(absl::StrCat("trace ", path_, " is closed"));
  }
  if (gzflush(gz_file_, Z_SYNC_FLUSH) != Z_OK) {
    int zlib_error = Z_OK;
    return absl::DataLossError(
        absl::StrCat("cannot flush trace ", path_, ": ", gzerror(gz_file_, &zlib_error)));
  }
  return absl::OkStatus();
}

absl::Status TraceWriter::Close() {
  MutexLock lock(&mu_);
  if (gz_file_ == nullptr) return absl::OkStatus();
  const int result = gzclose(gz_file_);
  gz_file_ = nullptr;
  if (result != Z_OK) {
    return absl::DataLossError(absl::StrCat("cannot close trace ", path_, " (zlib error ",
                                            result, ")"));
  }
  return absl::OkStatus();
}

}  // namespace tidepool
