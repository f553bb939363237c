// Tests of the trace reader and writer: what a recorder writes, a replay must read back exactly,
// compressed or not; rows that describe no allocation are skipped; and a malformed file is
// refused with the line that is wrong, because a silently misread trace would give wrong
// fragmentation figures.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "trace/trace.h"
#include "tests/trace/trace_test_util.h"

namespace tidepool {
namespace {

using testing::ScratchPath;

std::string ReadBytes(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(file), std::istreambuf_iterator<char>());
}

std::vector<TraceEvent> SampleEvents() {
  std::vector<TraceEvent> events(3);
  events[0] = {0, 0, TraceAction::kAllocate, 0x7f4613e00000, 37632, 0x0, 0};
  events[1] = {1, 12, TraceAction::kAllocate, 0x7f4613e09400, 256, 0x2f7bb8b0, 0};
  events[2] = {0, 40, TraceAction::kFree, 0x7f4613e00000, 37632, 0x0, 0};
  return events;
}

void WriteSample(const std::string& path) {
  absl::StatusOr<std::unique_ptr<TraceWriter>> writer = TraceWriter::Open(path);
  REQUIRE(writer.ok());
  for (const TraceEvent& event : SampleEvents()) REQUIRE((*writer)->Append(event).ok());
  REQUIRE((*writer)->Close().ok());
}

void RequireSampleEvents(const Trace& trace) {
  const std::vector<TraceEvent> expected = SampleEvents();
  REQUIRE(trace.events.size() == expected.size());
  for (size_t i = 0; i < expected.size(); ++i) {
    INFO("event " << i);
    CHECK(trace.events[i].thread == expected[i].thread);
    CHECK(trace.events[i].time_us == expected[i].time_us);
    CHECK(trace.events[i].action == expected[i].action);
    CHECK(trace.events[i].pointer == expected[i].pointer);
    CHECK(trace.events[i].size == expected[i].size);
    CHECK(trace.events[i].stream == expected[i].stream);
    CHECK(trace.events[i].line == static_cast<int64_t>(i) + 2);  // line 1 is the header
  }
}

TEST_CASE("a written plain trace reads back unchanged") {
  const std::string path = ScratchPath("round_trip.csv");
  WriteSample(path);
  const std::string text = ReadBytes(path);
  CHECK(text.rfind("Thread,Time,Action,Pointer,Size,Stream\n0,0,allocate,0x7f4613e00000,37632,0x0\n",
                   0) == 0);
  absl::StatusOr<Trace> trace = ReadTrace(path);
  REQUIRE(trace.ok());
  RequireSampleEvents(*trace);
}

TEST_CASE("a writer compresses a .gz path and the reader decompresses it") {
  const std::string path = ScratchPath("round_trip.csv.gz");
  WriteSample(path);
  const std::string bytes = ReadBytes(path);
  REQUIRE(bytes.size() >= 2);
  CHECK(static_cast<unsigned char>(bytes[0]) == 0x1f);  // the gzip magic number
  CHECK(static_cast<unsigned char>(bytes[1]) == 0x8b);
  absl::StatusOr<Trace> trace = ReadTrace(path);
  REQUIRE(trace.ok());
  RequireSampleEvents(*trace);
}

TEST_CASE("allocate failure rows are skipped and counted") {
  absl::StatusOr<Trace> trace = ParseTrace(
      "Thread,Time,Action,Pointer,Size,Stream\n"
      "0,10,allocate,0x1000,512,0x0\n"
      "0,11,allocate failure,0x0,99999999999,0x0\n"
      "0,12,free,0x1000,512,0x0\n",
      "inline");
  REQUIRE(trace.ok());
  REQUIRE(trace->events.size() == 2);
  CHECK(trace->events[0].action == TraceAction::kAllocate);
  CHECK(trace->events[1].action == TraceAction::kFree);
  CHECK(trace->skipped_failures == 1);
  // Times are rebased on the first event.
  CHECK(trace->events[0].time_us == 0);
  CHECK(trace->events[1].time_us == 2);
}

TEST_CASE("RMM clock times and decimal seconds become microseconds since the first event") {
  absl::StatusOr<Trace> clock = ParseTrace(
      "Thread,Time,Action,Pointer,Size,Stream\n"
      "140573312345856,23:59:59.999990,allocate,0x7f8a40000000,1024,0x7f8a38001020\n"
      "140573312345856,00:00:00.000015,deallocate,0x7f8a40000000,1024,0x7f8a38001020\n",
      "clock");
  REQUIRE(clock.ok());
  REQUIRE(clock->events.size() == 2);
  CHECK(clock->events[0].thread == 140573312345856u);
  CHECK(clock->events[1].time_us == 25);  // across midnight
  CHECK(clock->events[1].action == TraceAction::kFree);

  absl::StatusOr<Trace> seconds = ParseTrace(
      "Thread,Time,Action,Pointer,Size,Stream\n"
      "1,1634567890.234567,allocate,0x10,8,0x0\n"
      "1,1634567890.5,free,0x10,8,0x0\n",
      "seconds");
  REQUIRE(seconds.ok());
  CHECK(seconds->events[1].time_us == 265433);
}

TEST_CASE("a malformed row is refused with its line number") {
  absl::StatusOr<Trace> bad_pointer = ParseTrace(
      "Thread,Time,Action,Pointer,Size,Stream\n"
      "0,0,allocate,0x1000,512,0x0\n"
      "0,1,allocate,not-hex,512,0x0\n",
      "broken.csv");
  REQUIRE_FALSE(bad_pointer.ok());
  CHECK(bad_pointer.status().code() == absl::StatusCode::kInvalidArgument);
  CHECK(bad_pointer.status().message().find("broken.csv:3:") == 0);
  CHECK(bad_pointer.status().message().find("Pointer") != absl::string_view::npos);

  absl::StatusOr<Trace> missing_field =
      ParseTrace("Thread,Time,Action,Pointer,Size,Stream\n0,0,allocate,0x1000,512\n", "short.csv");
  REQUIRE_FALSE(missing_field.ok());
  CHECK(missing_field.status().message().find("short.csv:2:") == 0);

  absl::StatusOr<Trace> bad_action = ParseTrace(
      "Thread,Time,Action,Pointer,Size,Stream\n0,0,reallocate,0x1000,512,0x0\n", "action.csv");
  REQUIRE_FALSE(bad_action.ok());
  CHECK(bad_action.status().message().find("action.csv:2:") == 0);

  absl::StatusOr<Trace> no_header = ParseTrace("0,0,allocate,0x1000,512,0x0\n", "headless.csv");
  REQUIRE_FALSE(no_header.ok());
  CHECK(no_header.status().message().find("headless.csv:1:") == 0);
}

TEST_CASE("a missing file is NOT_FOUND") {
  absl::StatusOr<Trace> trace = ReadTrace(ScratchPath("does_not_exist.csv"));
  REQUIRE_FALSE(trace.ok());
  CHECK(trace.status().code() == absl::StatusCode::kNotFound);
}

TEST_CASE("a closed writer refuses rows") {
  absl::StatusOr<std::unique_ptr<TraceWriter>> writer =
      TraceWriter::Open(ScratchPath("closed.csv"));
  REQUIRE(writer.ok());
  REQUIRE((*writer)->Close().ok());
  CHECK((*writer)->Append(SampleEvents()[0]).code() == absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace tidepool
