// CUDA graph capture through the C API, on the simulated devices: a capture into a private pool
// (begin, allocations on the capturing stream and on a stream that joined it, end, launch,
// destroy, and the pool released once the graph and its blocks are gone), two graphs sharing a
// pool from tidepool_graph_pool_create and from tidepool_graph_pool, abandon, a capture the
// driver invalidated, an end without a graph to store, and every misuse with its code, its
// message and proof that it changed nothing.
//
// The C API has no call for a stream of a simulated device, nor for invalidating a capture: the
// tests reach the SimulatedDevice behind the runtime for both.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "allocator/caching_allocator.h"
#include "allocator/simulated_device.h"
#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "tests/c_api/c_api_test_util.h"

namespace tidepool {
namespace {

using c_api_test::CheckMisuses;
using c_api_test::Misuse;
using c_api_test::InfoOf;
using c_api_test::kDevices;
using c_api_test::NewPoolId;
using c_api_test::NewStream;
using c_api_test::PoolOf;
using c_api_test::PoolsOf;
using c_api_test::SamePool;
using c_api_test::Simulated;
using c_api_test::StartSimulatedRuntime;
using c_api_test::StatsOf;
using c_api_test::ToPoolId;

constexpr tidepool_pool_id kDefaultPool = {0, 0};


int CapturesUnderway(int device) { return PoolsOf(device).allocator()->captures_underway(); }

bool IsGraphPoolId(tidepool_pool_id pool) { return pool.first != 0 && pool.second == 0; }

void* Malloc(size_t bytes, int device, Stream stream) {
  void* block = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&block, bytes, device, stream));
  return block;
}

tidepool_capture* Begin(int device, Stream stream, const tidepool_pool_id* share_pool = nullptr) {
  tidepool_capture* capture = nullptr;
  TIDEPOOL_REQUIRE_OK(
      tidepool_capture_begin(device, stream, share_pool, TIDEPOOL_CAPTURE_MODE_GLOBAL, &capture));
  REQUIRE(capture != nullptr);
  return capture;
}

tidepool_pool_id PoolOfCapture(const tidepool_capture* capture) {
  tidepool_pool_id pool{};
  TIDEPOOL_REQUIRE_OK(tidepool_capture_pool(capture, &pool));
  return pool;
}

tidepool_pool_id PoolOfGraph(const tidepool_graph* graph) {
  tidepool_pool_id pool{};
  TIDEPOOL_REQUIRE_OK(tidepool_graph_pool(graph, &pool));
  return pool;
}

tidepool_graph* End(tidepool_capture* capture) {
  tidepool_graph* graph = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_capture_end(capture, &graph));
  REQUIRE(graph != nullptr);
  return graph;
}

TEST_CASE("a capture into a private pool: begin, allocate, end, launch, destroy") {
  StartSimulatedRuntime();
  Stream stream = NewStream(0);
  Stream joined = NewStream(0);
  Stream other = NewStream(0);
  const int64_t graphs_before = Simulated(0).live_graphs();

  tidepool_capture* capture = Begin(0, stream);
  const tidepool_pool_id pool = PoolOfCapture(capture);
  CHECK(IsGraphPoolId(pool));
  CHECK(CapturesUnderway(0) == 1);
  CHECK(InfoOf(0, pool).references == 1);
  CHECK(InfoOf(0, pool).routes == 1);

  // The capturing stream, and a stream that joined the capture, allocate from its pool; other
  // streams (and the same stream on the other device) do not.
  Simulated(0).JoinCapture(joined, stream);
  void* first = Malloc(1000, 0, stream);
  void* second = Malloc(3 << 20, 0, stream);
  void* on_joined = Malloc(70000, 0, joined);
  void* temporary = Malloc(4096, 0, stream);
  void* outside = Malloc(1000, 0, other);
  void* on_default_stream = Malloc(1000, 0, nullptr);
  for (void* block : {first, second, on_joined, temporary}) CHECK(SamePool(PoolOf(block), pool));
  CHECK(SamePool(PoolOf(outside), kDefaultPool));
  CHECK(SamePool(PoolOf(on_default_stream), kDefaultPool));
  // Freed inside the capture, on its own stream: reusable in stream order, as always.
  TIDEPOOL_REQUIRE_OK(tidepool_free(temporary));

  tidepool_graph* graph = End(capture);
  CHECK(CapturesUnderway(0) == 0);
  CHECK(SamePool(PoolOfGraph(graph), pool));
  CHECK(InfoOf(0, pool).references == 1);
  CHECK(InfoOf(0, pool).routes == 0);
  CHECK(Simulated(0).live_graphs() == graphs_before + 1);
  void* after_end = Malloc(1000, 0, stream);
  CHECK(SamePool(PoolOf(after_end), kDefaultPool));

  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(graph, stream));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(graph, stream));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(graph, other));

  // The graph pool keeps its memory through empty_cache; trim refuses it while it is held.
  const int64_t reserved = StatsOf(0, pool).reserved_bytes.current;
  CHECK(reserved > 0);
  TIDEPOOL_REQUIRE_OK(tidepool_empty_cache(0));
  CHECK(StatsOf(0, pool).reserved_bytes.current == reserved);
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_trim_pool(0, pool));

  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(graph));
  CHECK(Simulated(0).live_graphs() == graphs_before);
  PoolInfo info = InfoOf(0, pool);
  CHECK(info.references == 0);
  CHECK(info.released);
  CHECK(info.live_blocks == 3);  // the graph's outputs outlive it
  for (void* block : {first, second, on_joined}) TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  CHECK(InfoOf(0, pool).live_blocks == 0);
  CHECK(StatsOf(0, pool).reserved_bytes.current == 0);
  for (void* block : {outside, on_default_stream, after_end}) {
    TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  }
  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(nullptr));
}

TEST_CASE("two graphs share a pool made by tidepool_graph_pool_create") {
  StartSimulatedRuntime();
  Stream first_stream = NewStream(1);
  Stream second_stream = NewStream(1);
  tidepool_pool_id shared{};
  TIDEPOOL_REQUIRE_OK(tidepool_graph_pool_create(1, &shared));
  CHECK(IsGraphPoolId(shared));
  CHECK(InfoOf(1, shared).references == 1);
  CHECK(InfoOf(1, shared).routes == 0);

  tidepool_capture* first_capture = Begin(1, first_stream, &shared);
  CHECK(SamePool(PoolOfCapture(first_capture), shared));
  CHECK(InfoOf(1, shared).references == 2);
  void* first_output = Malloc(5000, 1, first_stream);
  void* first_scratch = Malloc(2 << 20, 1, first_stream);
  CHECK(SamePool(PoolOf(first_output), shared));
  CHECK(SamePool(PoolOf(first_scratch), shared));
  TIDEPOOL_REQUIRE_OK(tidepool_free(first_scratch));
  tidepool_graph* first = End(first_capture);
  CHECK(SamePool(PoolOfGraph(first), shared));

  // The handle's reference goes; the first graph keeps the pool, so it can still be shared.
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(1, shared));
  CHECK(InfoOf(1, shared).references == 1);
  CHECK_FALSE(InfoOf(1, shared).released);

  tidepool_capture* second_capture = Begin(1, second_stream, &shared);
  void* second_output = Malloc(5000, 1, second_stream);
  CHECK(SamePool(PoolOf(second_output), shared));
  tidepool_graph* second = End(second_capture);
  CHECK(SamePool(PoolOfGraph(second), shared));
  CHECK(InfoOf(1, shared).references == 2);

  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(first, first_stream));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(second, first_stream));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(first));
  CHECK(InfoOf(1, shared).references == 1);
  CHECK_FALSE(InfoOf(1, shared).released);
  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(second, second_stream));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(second));
  CHECK(InfoOf(1, shared).references == 0);
  CHECK(InfoOf(1, shared).released);
  TIDEPOOL_REQUIRE_OK(tidepool_free(first_output));
  TIDEPOOL_REQUIRE_OK(tidepool_free(second_output));
  CHECK(StatsOf(1, shared).reserved_bytes.current == 0);
  // The pool is gone: it can be shared no more, nor released again.
  tidepool_capture* refused = nullptr;
  TIDEPOOL_REQUIRE_STATUS(
      TIDEPOOL_FAILED_PRECONDITION,
      tidepool_capture_begin(1, first_stream, &shared, TIDEPOOL_CAPTURE_MODE_GLOBAL, &refused));
  CHECK(refused == nullptr);
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_release_pool(1, shared));
}

TEST_CASE("a second graph shares the first graph's pool through tidepool_graph_pool") {
  StartSimulatedRuntime();
  Stream first_stream = NewStream(0);
  Stream second_stream = NewStream(0);
  tidepool_graph* first = End(Begin(0, first_stream));
  const tidepool_pool_id pool = PoolOfGraph(first);
  CHECK(InfoOf(0, pool).references == 1);

  // Sharing with a live capture's pool too: both captures run at once, into the same pool.
  tidepool_capture* second_capture = Begin(0, second_stream, &pool);
  Stream third_stream = NewStream(0);
  const tidepool_pool_id capture_pool = PoolOfCapture(second_capture);
  CHECK(SamePool(capture_pool, pool));
  tidepool_capture* third_capture = Begin(0, third_stream, &capture_pool);
  CHECK(CapturesUnderway(0) == 2);
  CHECK(InfoOf(0, pool).references == 3);
  void* second_block = Malloc(1000, 0, second_stream);
  void* third_block = Malloc(1000, 0, third_stream);
  CHECK(SamePool(PoolOf(second_block), pool));
  CHECK(SamePool(PoolOf(third_block), pool));
  tidepool_graph* second = End(second_capture);
  TIDEPOOL_REQUIRE_OK(tidepool_capture_abandon(third_capture));
  CHECK(CapturesUnderway(0) == 0);
  CHECK(InfoOf(0, pool).references == 2);
  CHECK(InfoOf(0, pool).routes == 0);

  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(first));
  CHECK(InfoOf(0, pool).references == 1);
  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(second, second_stream));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(second));
  CHECK(InfoOf(0, pool).released);
  TIDEPOOL_REQUIRE_OK(tidepool_free(second_block));
  TIDEPOOL_REQUIRE_OK(tidepool_free(third_block));
  CHECK(StatsOf(0, pool).reserved_bytes.current == 0);
}

TEST_CASE("abandon ends the capture, makes no graph and drops its reference") {
  StartSimulatedRuntime();
  Stream stream = NewStream(0);
  const int64_t graphs_before = Simulated(0).live_graphs();

  SECTION("a private pool is released") {
    tidepool_capture* capture = Begin(0, stream);
    const tidepool_pool_id pool = PoolOfCapture(capture);
    void* block = Malloc(1000, 0, stream);
    TIDEPOOL_REQUIRE_OK(tidepool_capture_abandon(capture));
    CHECK(CapturesUnderway(0) == 0);
    CHECK(Simulated(0).live_graphs() == graphs_before);
    PoolInfo info = InfoOf(0, pool);
    CHECK(info.references == 0);
    CHECK(info.routes == 0);
    CHECK(info.released);
    void* after = Malloc(1000, 0, stream);
    CHECK(SamePool(PoolOf(after), kDefaultPool));
    CHECK(SamePool(PoolOf(block), pool));
    TIDEPOOL_REQUIRE_OK(tidepool_free(block));
    TIDEPOOL_REQUIRE_OK(tidepool_free(after));
    CHECK(StatsOf(0, pool).reserved_bytes.current == 0);
  }

  SECTION("a shared pool stays with its other holders") {
    tidepool_pool_id shared{};
    TIDEPOOL_REQUIRE_OK(tidepool_graph_pool_create(0, &shared));
    tidepool_capture* capture = Begin(0, stream, &shared);
    void* block = Malloc(1000, 0, stream);
    TIDEPOOL_REQUIRE_OK(tidepool_capture_abandon(capture));
    CHECK(CapturesUnderway(0) == 0);
    CHECK(InfoOf(0, shared).references == 1);
    CHECK(InfoOf(0, shared).routes == 0);
    CHECK_FALSE(InfoOf(0, shared).released);
    TIDEPOOL_REQUIRE_OK(tidepool_free(block));
    CHECK(StatsOf(0, shared).reserved_bytes.current > 0);  // a graph pool keeps its memory
    TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, shared));
    CHECK(StatsOf(0, shared).reserved_bytes.current == 0);
  }
}

TEST_CASE("a capture the driver invalidated: end fails, consumes the capture, cleans up") {
  StartSimulatedRuntime();
  Stream stream = NewStream(0);
  const int64_t graphs_before = Simulated(0).live_graphs();

  SECTION("a private pool is released") {
    tidepool_capture* capture = Begin(0, stream);
    const tidepool_pool_id pool = PoolOfCapture(capture);
    void* block = Malloc(1000, 0, stream);
    Simulated(0).InvalidateCapture(stream);
    tidepool_graph* graph = reinterpret_cast<tidepool_graph*>(&graph);
    TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INTERNAL, tidepool_capture_end(capture, &graph));
    const std::string message = tidepool_last_error();
    INFO(message);
    CHECK(message.rfind("tidepool_capture_end: ", 0) == 0);
    CHECK(message.find("invalidated") != std::string::npos);
    CHECK(message.find("cleaned up") != std::string::npos);
    CHECK(graph == nullptr);
    CHECK(CapturesUnderway(0) == 0);
    CHECK(Simulated(0).live_graphs() == graphs_before);
    PoolInfo info = InfoOf(0, pool);
    CHECK(info.references == 0);
    CHECK(info.routes == 0);
    CHECK(info.released);
    TIDEPOOL_REQUIRE_OK(tidepool_free(block));
    CHECK(StatsOf(0, pool).reserved_bytes.current == 0);
    // The stream captures again as before.
    TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(End(Begin(0, stream))));
  }

  SECTION("a shared pool stays with its other holders") {
    tidepool_pool_id shared{};
    TIDEPOOL_REQUIRE_OK(tidepool_graph_pool_create(0, &shared));
    tidepool_capture* capture = Begin(0, stream, &shared);
    Simulated(0).InvalidateCapture(stream);
    tidepool_graph* graph = nullptr;
    TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INTERNAL, tidepool_capture_end(capture, &graph));
    CHECK(graph == nullptr);
    CHECK(InfoOf(0, shared).references == 1);
    CHECK(InfoOf(0, shared).routes == 0);
    TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, shared));
  }

  SECTION("abandoning an invalidated capture is no error") {
    tidepool_capture* capture = Begin(0, stream);
    const tidepool_pool_id pool = PoolOfCapture(capture);
    Simulated(0).InvalidateCapture(stream);
    TIDEPOOL_REQUIRE_OK(tidepool_capture_abandon(capture));
    CHECK(CapturesUnderway(0) == 0);
    CHECK(Simulated(0).live_graphs() == graphs_before);
    CHECK(InfoOf(0, pool).released);
  }
}

TEST_CASE("an end with nowhere to store the graph abandons the capture") {
  StartSimulatedRuntime();
  Stream stream = NewStream(1);
  const int64_t graphs_before = Simulated(1).live_graphs();
  tidepool_capture* capture = Begin(1, stream);
  const tidepool_pool_id pool = PoolOfCapture(capture);
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_INVALID_ARGUMENT, tidepool_capture_end(capture, nullptr));
  CHECK(std::string(tidepool_last_error()).find("graph is NULL") != std::string::npos);
  CHECK(CapturesUnderway(1) == 0);
  CHECK(Simulated(1).live_graphs() == graphs_before);
  CHECK(InfoOf(1, pool).released);
  CHECK(InfoOf(1, pool).routes == 0);
}

TEST_CASE("the capture modes are accepted") {
  StartSimulatedRuntime();
  Stream stream = NewStream(0);
  for (int mode : {TIDEPOOL_CAPTURE_MODE_GLOBAL, TIDEPOOL_CAPTURE_MODE_THREAD_LOCAL,
                   TIDEPOOL_CAPTURE_MODE_RELAXED}) {
    INFO("mode " << mode);
    tidepool_capture* capture = nullptr;
    TIDEPOOL_REQUIRE_OK(tidepool_capture_begin(0, stream, nullptr, mode, &capture));
    TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(End(capture)));
  }
  CHECK(CapturesUnderway(0) == 0);
}


TEST_CASE("every misuse of the graph calls returns its code and a message, and changes nothing") {
  StartSimulatedRuntime();
  Stream stream = NewStream(0);
  Stream capturing = NewStream(0);
  Stream on_device_1 = NewStream(1);
  // (Each simulated device numbers its streams from the same handle, so a stream of device 1 is
  // not an unknown one on device 0: only a handle no device made is.)
  void* const unknown_stream = reinterpret_cast<void*>(uintptr_t{0xdead0});

  // A capture underway, a graph, a user pool that is held, a graph pool released, one that no
  // device has had, and a held graph pool that device 1 does not have.
  tidepool_capture* capture = Begin(0, capturing);
  void* captured_block = Malloc(1000, 0, capturing);
  tidepool_graph* graph = End(Begin(0, stream));
  const tidepool_pool_id user_pool = NewPoolId();
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, user_pool));
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, user_pool));
  tidepool_pool_id released{};
  TIDEPOOL_REQUIRE_OK(tidepool_graph_pool_create(0, &released));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, released));
  tidepool_pool_id never{};
  TIDEPOOL_REQUIRE_OK(tidepool_new_graph_pool_id(&never));
  tidepool_pool_id held{};
  TIDEPOOL_REQUIRE_OK(tidepool_graph_pool_create(0, &held));

  tidepool_capture* out_capture = nullptr;
  tidepool_graph* out_graph = nullptr;
  tidepool_pool_id out_pool{};
  const auto begin = [&](int device, void* on, const tidepool_pool_id* share, int mode) {
    out_capture = reinterpret_cast<tidepool_capture*>(&out_capture);  // must become NULL
    const tidepool_status status = tidepool_capture_begin(device, on, share, mode, &out_capture);
    return out_capture == nullptr ? status : TIDEPOOL_INTERNAL;
  };
  constexpr int kGlobal = TIDEPOOL_CAPTURE_MODE_GLOBAL;
  const std::vector<Misuse> misuses = {
      {"tidepool_capture_begin",
       [&] { return tidepool_capture_begin(0, stream, nullptr, kGlobal, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "capture is NULL"},
      {"tidepool_capture_begin", [&] { return begin(2, stream, nullptr, kGlobal); },
       TIDEPOOL_NOT_FOUND, "device 2 is not a device tidepool knows"},
      {"tidepool_capture_begin", [&] { return begin(-1, stream, nullptr, kGlobal); },
       TIDEPOOL_INVALID_ARGUMENT, "device -1"},
      {"tidepool_capture_begin", [&] { return begin(0, stream, nullptr, 3); },
       TIDEPOOL_INVALID_ARGUMENT, "mode 3 is not a tidepool_capture_mode"},
      {"tidepool_capture_begin", [&] { return begin(0, stream, nullptr, -1); },
       TIDEPOOL_INVALID_ARGUMENT, "mode -1"},
      {"tidepool_capture_begin", [&] { return begin(0, nullptr, nullptr, kGlobal); },
       TIDEPOOL_INVALID_ARGUMENT, "default stream cannot be captured"},
      {"tidepool_capture_begin", [&] { return begin(0, unknown_stream, nullptr, kGlobal); },
       TIDEPOOL_INVALID_ARGUMENT, "unknown stream"},
      {"tidepool_capture_begin", [&] { return begin(0, capturing, nullptr, kGlobal); },
       TIDEPOOL_FAILED_PRECONDITION, "capturing already"},
      {"tidepool_capture_begin", [&] { return begin(0, stream, &kDefaultPool, kGlobal); },
       TIDEPOOL_INVALID_ARGUMENT, "default pool"},
      {"tidepool_capture_begin", [&] { return begin(0, stream, &user_pool, kGlobal); },
       TIDEPOOL_INVALID_ARGUMENT, "not a graph pool"},
      {"tidepool_capture_begin", [&] { return begin(0, stream, &never, kGlobal); },
       TIDEPOOL_NOT_FOUND, "never had"},
      {"tidepool_capture_begin", [&] { return begin(0, stream, &released, kGlobal); },
       TIDEPOOL_FAILED_PRECONDITION, "nothing holds"},
      {"tidepool_capture_begin", [&] { return begin(1, on_device_1, &held, kGlobal); },
       TIDEPOOL_NOT_FOUND, "never had"},
      {"tidepool_capture_end", [&] { return tidepool_capture_end(nullptr, &out_graph); },
       TIDEPOOL_INVALID_ARGUMENT, "capture is NULL"},
      {"tidepool_capture_end", [] { return tidepool_capture_end(nullptr, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "capture is NULL"},
      {"tidepool_capture_abandon", [] { return tidepool_capture_abandon(nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "capture is NULL"},
      {"tidepool_capture_pool", [&] { return tidepool_capture_pool(nullptr, &out_pool); },
       TIDEPOOL_INVALID_ARGUMENT, "capture is NULL"},
      {"tidepool_capture_pool", [&] { return tidepool_capture_pool(capture, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "pool is NULL"},
      {"tidepool_graph_launch", [&] { return tidepool_graph_launch(nullptr, stream); },
       TIDEPOOL_INVALID_ARGUMENT, "graph is NULL"},
      {"tidepool_graph_launch", [&] { return tidepool_graph_launch(graph, unknown_stream); },
       TIDEPOOL_INVALID_ARGUMENT, "unknown stream"},
      {"tidepool_graph_pool", [&] { return tidepool_graph_pool(nullptr, &out_pool); },
       TIDEPOOL_INVALID_ARGUMENT, "graph is NULL"},
      {"tidepool_graph_pool", [&] { return tidepool_graph_pool(graph, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "pool is NULL"},
      {"tidepool_graph_pool_create", [] { return tidepool_graph_pool_create(0, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "pool is NULL"},
      {"tidepool_graph_pool_create", [&] { return tidepool_graph_pool_create(2, &out_pool); },
       TIDEPOOL_NOT_FOUND, "device 2 is not a device tidepool knows"},
      {"tidepool_graph_pool_create", [&] { return tidepool_graph_pool_create(-1, &out_pool); },
       TIDEPOOL_INVALID_ARGUMENT, "device -1"},
  };

  const std::vector<tidepool_pool_id> pools = {kDefaultPool, PoolOfCapture(capture),
                                               PoolOfGraph(graph), user_pool, released, never,
                                               held};
  CheckMisuses(misuses, pools);
  CHECK(out_graph == nullptr);

  // What was set up still works, and goes.
  CHECK(SamePool(PoolOf(captured_block), PoolOfCapture(capture)));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(graph, stream));
  tidepool_graph* captured = End(capture);
  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(captured));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(graph));
  TIDEPOOL_REQUIRE_OK(tidepool_free(captured_block));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, user_pool));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, held));
  CHECK(CapturesUnderway(0) == 0);
}

}  // namespace
}  // namespace tidepool
