// Tests of the trace replay loop that tidepool and the PyTorch anchor share
// (bench/replay_loop.h), against a fake allocator that hands out addresses from a counter and
// keeps a reserved figure the test sets: counts, the live-bytes floor, the timeline's buckets,
// latency summaries, the blocks left live, and the errors that name a trace line.
#include <catch2/catch.hpp>

#include <chrono>
#include <cstdint>
#include <map>
#include <string>
#include <thread>
#include <vector>

#include "bench/replay_loop.h"

namespace tidepool {
namespace {

using bench::LoopEvent;
using bench::LoopResult;

class FakeAllocator {
 public:
  bool Allocate(size_t bytes, uint64_t stream, void** block, std::string* error) {
    if (bytes == fail_at_size) {
      *error = "refused on purpose";
      return false;
    }
    if (bytes == slow_size) std::this_thread::sleep_for(std::chrono::milliseconds(5));
    next_ += 0x1000;
    *block = reinterpret_cast<void*>(next_);
    blocks_[next_] = bytes;
    streams.push_back(stream);
    reserved += static_cast<int64_t>(bytes);
    return true;
  }
  bool Free(void* block, std::string* error) {
    auto it = blocks_.find(reinterpret_cast<uintptr_t>(block));
    if (it == blocks_.end()) {
      *error = "not mine";
      return false;
    }
    blocks_.erase(it);  // the fake keeps what it reserved: a cache that never shrinks
    return true;
  }
  int64_t ReservedBytes() { return reserved; }

  size_t fail_at_size = 0;
  size_t slow_size = 0;  // an allocation of this size takes 5 ms
  int64_t reserved = 0;
  std::vector<uint64_t> streams;

 private:
  uintptr_t next_ = 0x100000;
  std::map<uintptr_t, size_t> blocks_;
};

LoopEvent Allocate(uintptr_t pointer, size_t size, uint64_t stream, int64_t line) {
  return LoopEvent{true, pointer, size, stream, line};
}
LoopEvent Free(uintptr_t pointer, int64_t line) { return LoopEvent{false, pointer, 0, 0, line}; }

TEST_CASE("the loop counts, keeps the live floor, and leaves the unfreed blocks to the caller") {
  const std::vector<LoopEvent> events = {
      Allocate(0xa, 100, 7, 2), Allocate(0xb, 300, 9, 3), Free(0xa, 4),
      Allocate(0xc, 50, 7, 5),  Free(0xb, 6),
  };
  FakeAllocator fake;
  LoopResult result;
  std::string error;
  REQUIRE(bench::ReplayLoop(events, fake, &result, &error));
  CHECK(result.allocations == 3);
  CHECK(result.frees == 2);
  CHECK(result.peak_live_bytes == 400);  // 100 + 300, before the first free
  CHECK(fake.streams == std::vector<uint64_t>{7, 9, 7});
  REQUIRE(result.live.size() == 1);
  CHECK(result.live.count(0xc) == 1);
  CHECK(result.live.at(0xc).requested_bytes == 50);
  CHECK(result.live.at(0xc).allocated_at_line == 5);
  // Five events: one point each (fewer events than points), the bucket's most live bytes.
  REQUIRE(result.timeline.size() == 5);
  CHECK(result.timeline[1].event == 2);
  CHECK(result.timeline[1].live_bytes == 400);
  CHECK(result.timeline[4].live_bytes == 350);  // the bucket's most: before the free of 0xb
  CHECK(result.timeline[4].reserved_bytes == 450);
  CHECK(result.malloc_latency.max_ns >= result.malloc_latency.p99_ns);
  CHECK(result.malloc_latency.p99_ns >= result.malloc_latency.p50_ns);
  CHECK(result.malloc_latency.total_ns >= result.malloc_latency.max_ns);
  // Wall time per operation: the calls' time, mallocs and frees, over the 5 calls.
  const double per_op = bench::WallPerOperationNs(result.malloc_latency, result.free_latency, 5);
  CHECK(per_op * 5 == Approx(static_cast<double>(result.malloc_latency.total_ns +
                                                 result.free_latency.total_ns)));
  CHECK(per_op > 0);
  CHECK(bench::WallPerOperationNs(result.malloc_latency, result.free_latency, 0) == 0.0);
}

TEST_CASE("the timeline has at most kTimelinePoints points, each a bucket's most live bytes") {
  std::vector<LoopEvent> events;
  for (int i = 0; i < 2500; ++i) {
    events.push_back(Allocate(0x10 + i, 1 + i % 7, 0, i + 2));
    events.push_back(Free(0x10 + i, i + 2));
  }
  FakeAllocator fake;
  LoopResult result;
  std::string error;
  REQUIRE(bench::ReplayLoop(events, fake, &result, &error));
  CHECK(result.timeline.size() <= static_cast<size_t>(LoopResult::kTimelinePoints));
  CHECK(result.timeline.back().event == 5000);
  for (const bench::LoopPoint& point : result.timeline) CHECK(point.live_bytes > 0);
}

TEST_CASE("the latency summary names the slowest call's trace line") {
  FakeAllocator fake;
  fake.slow_size = 300;
  LoopResult result;
  std::string error;
  REQUIRE(bench::ReplayLoop({Allocate(0xa, 100, 0, 2), Allocate(0xb, 300, 0, 3),
                             Allocate(0xc, 50, 0, 4), Free(0xb, 5)},
                            fake, &result, &error));
  CHECK(result.malloc_latency.max_line == 3);
  CHECK(result.malloc_latency.max_ns >= 5'000'000);
  CHECK(result.free_latency.max_line == 5);  // the only free
}

TEST_CASE("a trace's own mistakes and the allocator's refusals stop the loop at their line") {
  FakeAllocator fake;
  std::string error;
  SECTION("a pointer allocated while still live") {
    LoopResult result;
    CHECK_FALSE(bench::ReplayLoop({Allocate(0xa, 8, 0, 2), Allocate(0xa, 8, 0, 3)}, fake, &result,
                                  &error));
    CHECK(error.find("trace line 3") != std::string::npos);
    CHECK(error.find("still live (allocated at line 2)") != std::string::npos);
    CHECK(result.live.size() == 1);  // the first one, for the caller to free
  }
  SECTION("a free of a pointer never allocated") {
    LoopResult result;
    CHECK_FALSE(bench::ReplayLoop({Free(0xdead, 2)}, fake, &result, &error));
    CHECK(error.find("trace line 2") != std::string::npos);
    CHECK(error.find("never allocated") != std::string::npos);
  }
  SECTION("the allocator refuses") {
    fake.fail_at_size = 99;
    LoopResult result;
    CHECK_FALSE(bench::ReplayLoop({Allocate(0xa, 8, 0, 2), Allocate(0xb, 99, 0, 3)}, fake,
                                  &result, &error));
    CHECK(error.find("trace line 3") != std::string::npos);
    CHECK(error.find("refused on purpose") != std::string::npos);
    CHECK(result.allocations == 1);
  }
}

}  // namespace
}  // namespace tidepool
