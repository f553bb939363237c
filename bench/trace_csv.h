// Reads a trace (the replay CSV format of trace/trace.h: Thread,Time,Action,Pointer,Size,Stream)
// into the events bench/replay_loop.h replays, with standard C++ only: the PyTorch anchor is
// built on the GPU host without Abseil or zlib, so a `.gz` file is read through `gzip -dc`.
// Only what replay needs is read (action, pointer, size, stream); `allocate failure` rows are
// skipped, as trace/trace.h skips them, and `deallocate` is a free. tests/trace/trace_csv_test
// checks that this reader and trace/trace.h agree on every bundled trace.
#ifndef TIDEPOOL_BENCH_TRACE_CSV_H_
#define TIDEPOOL_BENCH_TRACE_CSV_H_

#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "bench/replay_loop.h"

namespace tidepool {
namespace bench {

// Parses one data row; false if it is malformed. Sets *skip for rows that replay ignores.
inline bool ParseTraceRow(const std::string& row, LoopEvent* event, bool* skip) {
  std::vector<std::string> fields;
  size_t start = 0;
  while (true) {
    const size_t comma = row.find(',', start);
    fields.push_back(row.substr(start, comma == std::string::npos ? std::string::npos
                                                                  : comma - start));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  if (fields.size() != 6) return false;
  std::string action = fields[2];
  while (!action.empty() && (action.back() == ' ' || action.back() == '\r')) action.pop_back();
  *skip = false;
  if (action == "allocate") {
    event->allocate = true;
  } else if (action == "free" || action == "deallocate") {
    event->allocate = false;
  } else if (action == "allocate failure") {
    *skip = true;
    return true;
  } else {
    return false;
  }
  auto number = [](const std::string& text, int base, uint64_t* out) {
    if (text.empty()) return false;
    char* end = nullptr;
    *out = std::strtoull(text.c_str(), &end, base);
    while (end != nullptr && (*end == ' ' || *end == '\r')) ++end;
    return end != nullptr && *end == '\0';
  };
  uint64_t pointer = 0;
  uint64_t size = 0;
  uint64_t stream = 0;
  if (!number(fields[3], 16, &pointer) || !number(fields[4], 10, &size) ||
      !number(fields[5], 16, &stream)) {
    return false;
  }
  event->pointer = static_cast<uintptr_t>(pointer);
  event->size = static_cast<size_t>(size);
  event->stream = stream;
  return true;
}

// Reads `path` (plain, or gzip-compressed when it ends in `.gz`) into `events`. False, with
// `error` naming the file and line, when it cannot be read.
inline bool ReadTraceCsv(const std::string& path, std::vector<LoopEvent>* events,
                         std::string* error) {
  const bool gz = path.size() > 3 && path.compare(path.size() - 3, 3, ".gz") == 0;
  FILE* file = nullptr;
  if (gz) {
    std::string quoted = "'";
    for (char c : path) quoted += c == '\'' ? std::string("'\\''") : std::string(1, c);
    quoted += "'";
    file = popen(("gzip -dc " + quoted).c_str(), "r");
  } else {
    file = std::fopen(path.c_str(), "r");
  }
  if (file == nullptr) {
    *error = "cannot open " + path;
    return false;
  }
  std::string row;
  int64_t line = 0;
  bool ok = true;
  int c = 0;
  do {
    c = std::fgetc(file);
    if (c != '\n' && c != EOF) {
      row += static_cast<char>(c);
      continue;
    }
    if (row.empty() && c == EOF) break;
    ++line;
    if (line == 1) {  // the header
      row.clear();
      continue;
    }
    if (!row.empty() && row != "\r") {
      LoopEvent event;
      bool skip = false;
      if (!ParseTraceRow(row, &event, &skip)) {
        *error = path + ":" + std::to_string(line) + ": not a trace row: \"" + row + "\"";
        ok = false;
        break;
      }
      event.line = line;
      if (!skip) events->push_back(event);
    }
    row.clear();
  } while (c != EOF);
  const int closed = gz ? pclose(file) : std::fclose(file);
  if (ok && closed != 0) {
    *error = "reading " + path + " failed" + (gz ? " (gzip -dc)" : "");
    ok = false;
  }
  return ok;
}

}  // namespace bench
}  // namespace tidepool

#endif  // TIDEPOOL_BENCH_TRACE_CSV_H_
