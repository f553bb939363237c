// Tests of trace recording and replay together: what the runtime records (trace/recorder.h) must
// read back as the calls that were made (pointers, requested sizes, stream ids, failures
// skipped), and replaying it must reproduce the live bytes the recording saw. This is the loop a
// user follows to compare configurations on their own workload (TIDEPOOL_TRACE).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>

#include <cstdlib>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/config.h"
#include "allocator/simulated_device.h"
#include "runtime/runtime.h"
#include "tests/trace/trace_test_util.h"
#include "tools/replay.h"
#include "trace/recorder.h"
#include "trace/trace.h"

namespace tidepool {
namespace {

using testing::ScratchPath;

// A runtime over one simulated device, recording to `path`.
std::unique_ptr<Runtime> MakeRecordingRuntime(SimulatedDevice* device, const std::string& path) {
  absl::StatusOr<std::unique_ptr<Runtime>> runtime = Runtime::Create({device}, Config{});
  REQUIRE(runtime.ok());
  absl::StatusOr<std::unique_ptr<TraceRecorder>> recorder = TraceRecorder::Open(path);
  REQUIRE(recorder.ok());
  (*runtime)->RecordTo(*std::move(recorder));
  return *std::move(runtime);
}

TEST_CASE("a recorded trace reads back as the calls made, and replays to the same live bytes") {
  SimulatedDevice device;
  const std::string path = ScratchPath("recorded.csv.gz");
  std::unique_ptr<Runtime> runtime = MakeRecordingRuntime(&device, path);
  absl::StatusOr<Stream> first_stream = device.CreateStream();
  absl::StatusOr<Stream> second_stream = device.CreateStream();
  REQUIRE(first_stream.ok());
  REQUIRE(second_stream.ok());
  absl::StatusOr<StreamId> first_id = device.GetStreamId(*first_stream);
  absl::StatusOr<StreamId> second_id = device.GetStreamId(*second_stream);
  REQUIRE(first_id.ok());
  REQUIRE(second_id.ok());

  absl::StatusOr<void*> small = runtime->Allocate(0, 1000, *first_stream);
  absl::StatusOr<void*> large = runtime->Allocate(0, 3 << 20, *second_stream);
  REQUIRE(small.ok());
  REQUIRE(large.ok());
  REQUIRE(runtime->Free(*small).ok());
  // Refused calls: a zero-byte allocation is recorded as a failure; a foreign free and an unknown
  // device not at all.
  CHECK_FALSE(runtime->Allocate(0, 0, *first_stream).ok());
  CHECK_FALSE(runtime->Allocate(5, 1000, *first_stream).ok());
  int not_a_block = 0;
  CHECK_FALSE(runtime->Free(&not_a_block).ok());
  REQUIRE(runtime->Free(*large).ok());
  REQUIRE(runtime->recorder()->Flush().ok());

  absl::StatusOr<Trace> trace = ReadTrace(path);
  REQUIRE(trace.ok());
  CHECK(trace->skipped_failures == 1);
  REQUIRE(trace->events.size() == 4);
  const TraceEvent& small_allocate = trace->events[0];
  CHECK(small_allocate.action == TraceAction::kAllocate);
  CHECK(small_allocate.pointer == reinterpret_cast<uintptr_t>(*small));
  CHECK(small_allocate.size == 1000);
  CHECK(small_allocate.stream == *first_id);
  CHECK(small_allocate.thread == trace->events[3].thread);
  CHECK(trace->events[1].pointer == reinterpret_cast<uintptr_t>(*large));
  CHECK(trace->events[1].stream == *second_id);
  const TraceEvent& small_free = trace->events[2];
  CHECK(small_free.action == TraceAction::kFree);
  CHECK(small_free.pointer == small_allocate.pointer);
  CHECK(small_free.size == 1000);
  CHECK(small_free.stream == *first_id);
  CHECK(trace->events[3].action == TraceAction::kFree);
  CHECK(trace->events[3].time_us >= small_free.time_us);

  runtime.reset();
  REQUIRE(device.DestroyStream(*first_stream).ok());
  REQUIRE(device.DestroyStream(*second_stream).ok());

  SimulatedDevice replay_device;
  absl::StatusOr<ReplayResult> replayed = ReplayTrace(*trace, &replay_device, Config{});
  REQUIRE(replayed.ok());
  CHECK(replayed->allocations == 2);
  CHECK(replayed->frees == 2);
  CHECK(replayed->streams == 2);
  CHECK(replayed->peak_live_bytes == 1000 + (3 << 20));
  CHECK(replayed->stats.reserved_bytes.peak >= replayed->peak_live_bytes);
  // Replay cleans up after itself: nothing is left on the device.
  CHECK(replay_device.used_bytes() == 0);
}

TEST_CASE("rows from many threads never show a pointer reused before its free") {
  constexpr int kThreads = 4;
  constexpr int kPairsPerThread = 500;
  SimulatedDevice device;
  const std::string path = ScratchPath("threads.csv");
  std::unique_ptr<Runtime> runtime = MakeRecordingRuntime(&device, path);
  // All threads share one stream, so that a block one thread frees is the next one another
  // thread gets: the case where a late free row would break replay.
  absl::StatusOr<Stream> stream = device.CreateStream();
  REQUIRE(stream.ok());
  std::vector<std::thread> threads;
  std::vector<absl::Status> errors(kThreads);
  for (int index = 0; index < kThreads; ++index) {
    threads.emplace_back([&, index] {
      for (int pair = 0; pair < kPairsPerThread && errors[index].ok(); ++pair) {
        absl::StatusOr<void*> block = runtime->Allocate(0, 512 * (1 + pair % 7), *stream);
        errors[index] = block.ok() ? runtime->Free(*block) : block.status();
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  for (const absl::Status& error : errors) CHECK(error.ok());
  REQUIRE(runtime->recorder()->Flush().ok());

  absl::StatusOr<Trace> trace = ReadTrace(path);
  REQUIRE(trace.ok());
  CHECK(trace->events.size() == 2 * kThreads * kPairsPerThread);
  SimulatedDevice replay_device;
  absl::StatusOr<ReplayResult> replayed = ReplayTrace(*trace, &replay_device, Config{});
  INFO(replayed.status().ToString());
  REQUIRE(replayed.ok());
  CHECK(replayed->allocations == kThreads * kPairsPerThread);

  runtime.reset();
  REQUIRE(device.DestroyStream(*stream).ok());
}

TEST_CASE("replay refuses a trace that frees what it never allocated, naming the line") {
  absl::StatusOr<Trace> trace = ParseTrace(
      "Thread,Time,Action,Pointer,Size,Stream\n"
      "0,0,allocate,0x1000,512,0x0\n"
      "0,1,free,0x2000,512,0x0\n",
      "inline");
  REQUIRE(trace.ok());
  SimulatedDevice device;
  absl::StatusOr<ReplayResult> replayed = ReplayTrace(*trace, &device, Config{});
  REQUIRE_FALSE(replayed.ok());
  CHECK(replayed.status().message().find("trace line 3") != absl::string_view::npos);
  CHECK(device.used_bytes() == 0);
}

}  // namespace
}  // namespace tidepool
