// The C API's error matrix: every kind of bad input or call out of order that a C caller can
// make, each with the code it must return, words its message must hold, and proof that it
// changed nothing (statistics, snapshots, pool references and routes, routing of this thread,
// before and after, on both simulated devices). Also: out of memory, and a failed malloc
// storing NULL.
#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
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
using c_api_test::PoolsOf;
using c_api_test::StartSimulatedRuntime;
using c_api_test::ToPoolId;

constexpr tidepool_pool_id kDefaultPool = {0, 0};

void* AllocateSegment(size_t, int, void*) { return nullptr; }
void FreeSegment(void*, size_t, int, void*) {}


TEST_CASE("every misuse returns its code and a message, and changes nothing") {
  StartSimulatedRuntime();
  void* live = nullptr;
  void* freed = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&live, 1000, 0, nullptr));
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&freed, 1000, 0, nullptr));
  TIDEPOOL_REQUIRE_OK(tidepool_free(freed));
  Stream stream = NewStream(0);
  int foreign = 0;
  const uint64_t unknown_stream = 0xdead0;

  // A pool with no references left, one routed on device 1 by this thread with its only
  // reference, and one that no device has had.
  const tidepool_pool_id released = NewPoolId();
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, released));
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, released));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, released));
  const tidepool_pool_id routed = NewPoolId();
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(1, routed));
  const tidepool_pool_id never = NewPoolId();

  char small[4];
  char json[1 << 16];
  int device = 0;
  tidepool_pool_id pool{};
  void* out = nullptr;
  const std::vector<Misuse> misuses = {
      {"tidepool_device_count", [] { return tidepool_device_count(nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "count is NULL"},
      {"tidepool_malloc", [] { return tidepool_malloc(nullptr, 1000, 0, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "ptr is NULL"},
      {"tidepool_malloc", [&] { return tidepool_malloc(&out, 0, 0, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "0 bytes"},
      {"tidepool_malloc", [&] { return tidepool_malloc(&out, SIZE_MAX, 0, nullptr); },
       TIDEPOOL_OUT_OF_MEMORY, "larger than any device"},
      {"tidepool_malloc", [&] { return tidepool_malloc(&out, 1000, 2, nullptr); },
       TIDEPOOL_NOT_FOUND, "device 2 is not a device tidepool knows"},
      {"tidepool_malloc", [&] { return tidepool_malloc(&out, 1000, -1, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "device -1"},
      {"tidepool_malloc",
       [&] { return tidepool_malloc(&out, 1000, 0, reinterpret_cast<void*>(unknown_stream)); },
       TIDEPOOL_INVALID_ARGUMENT, "unknown stream"},
      {"tidepool_free", [&] { return tidepool_free(&foreign); }, TIDEPOOL_INVALID_ARGUMENT,
       "not allocated by tidepool"},
      {"tidepool_free", [&] { return tidepool_free(static_cast<char*>(live) + 512); },
       TIDEPOOL_FAILED_PRECONDITION, "middle of a block"},
      {"tidepool_free", [&] { return tidepool_free(freed); }, TIDEPOOL_FAILED_PRECONDITION,
       "double free"},
      {"tidepool_record_stream", [&] { return tidepool_record_stream(&foreign, stream); },
       TIDEPOOL_INVALID_ARGUMENT, "not allocated by tidepool"},
      {"tidepool_record_stream", [&] { return tidepool_record_stream(freed, stream); },
       TIDEPOOL_FAILED_PRECONDITION, "not a live allocation"},
      {"tidepool_record_stream",
       [&] { return tidepool_record_stream(live, reinterpret_cast<void*>(unknown_stream)); },
       TIDEPOOL_INVALID_ARGUMENT, "unknown stream"},
      {"tidepool_empty_cache", [] { return tidepool_empty_cache(2); }, TIDEPOOL_NOT_FOUND,
       "device 2"},
      {"tidepool_new_pool_id", [] { return tidepool_new_pool_id(nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "pool is NULL"},
      {"tidepool_new_graph_pool_id", [] { return tidepool_new_graph_pool_id(nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "pool is NULL"},
      {"tidepool_begin_allocate_current_thread_to_pool",
       [&] { return tidepool_begin_allocate_current_thread_to_pool(7, never); }, TIDEPOOL_NOT_FOUND,
       "device 7 is not a device tidepool knows"},
      {"tidepool_begin_allocate_to_pool",
       [&] { return tidepool_begin_allocate_to_pool(7, never, TIDEPOOL_ROUTE_EVERYONE, 0); },
       TIDEPOOL_NOT_FOUND, "device 7"},
      {"tidepool_begin_allocate_to_pool",
       [&] { return tidepool_begin_allocate_to_pool(0, never, 9, 0); }, TIDEPOOL_INVALID_ARGUMENT,
       "filter kind 9"},
      {"tidepool_begin_allocate_to_pool",
       [&] { return tidepool_begin_allocate_to_pool(0, never, TIDEPOOL_ROUTE_CURRENT_THREAD, 1); },
       TIDEPOOL_INVALID_ARGUMENT, "takes none"},
      {"tidepool_begin_allocate_to_pool",
       [&] {
         return tidepool_begin_allocate_to_pool(0, never, TIDEPOOL_ROUTE_STREAM, unknown_stream);
       },
       TIDEPOOL_INVALID_ARGUMENT, "unknown stream"},
      {"tidepool_begin_allocate_to_pool",
       [&] { return tidepool_begin_allocate_to_pool(0, never, TIDEPOOL_ROUTE_CAPTURE, 0); },
       TIDEPOOL_INVALID_ARGUMENT, "capture id 0"},
      {"tidepool_end_allocate_to_pool", [&] { return tidepool_end_allocate_to_pool(0, never); },
       TIDEPOOL_FAILED_PRECONDITION, "without a matching begin"},
      {"tidepool_end_allocate_to_pool", [&] { return tidepool_end_allocate_to_pool(0, released); },
       TIDEPOOL_FAILED_PRECONDITION, "without a matching begin"},
      {"tidepool_end_allocate_to_pool", [&] { return tidepool_end_allocate_to_pool(0, routed); },
       TIDEPOOL_FAILED_PRECONDITION, "without a matching begin"},
      {"tidepool_end_allocate_to_pool", [&] { return tidepool_end_allocate_to_pool(3, routed); },
       TIDEPOOL_NOT_FOUND, "device 3"},
      {"tidepool_release_pool", [&] { return tidepool_release_pool(0, never); }, TIDEPOOL_NOT_FOUND,
       "never had"},
      {"tidepool_release_pool", [] { return tidepool_release_pool(0, kDefaultPool); },
       TIDEPOOL_INVALID_ARGUMENT, "default pool"},
      {"tidepool_release_pool", [&] { return tidepool_release_pool(0, released); },
       TIDEPOOL_FAILED_PRECONDITION, "double release"},
      {"tidepool_release_pool", [&] { return tidepool_release_pool(1, routed); },
       TIDEPOOL_FAILED_PRECONDITION, "end them first"},
      {"tidepool_trim_pool", [&] { return tidepool_trim_pool(0, never); }, TIDEPOOL_NOT_FOUND,
       "never had"},
      {"tidepool_pool_of", [&] { return tidepool_pool_of(&foreign, &device, &pool); },
       TIDEPOOL_INVALID_ARGUMENT, "not allocated by tidepool"},
      {"tidepool_pool_of", [&] { return tidepool_pool_of(freed, &device, &pool); },
       TIDEPOOL_FAILED_PRECONDITION, "not a live allocation"},
      {"tidepool_pool_of", [&] { return tidepool_pool_of(live, nullptr, &pool); },
       TIDEPOOL_INVALID_ARGUMENT, "device is NULL"},
      {"tidepool_pool_of", [&] { return tidepool_pool_of(live, &device, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "pool is NULL"},
      {"tidepool_stats_json",
       [&] { return tidepool_stats_json(0, &never, json, sizeof json, nullptr); },
       TIDEPOOL_NOT_FOUND, "never had"},
      {"tidepool_stats_json",
       [&] { return tidepool_stats_json(3, nullptr, json, sizeof json, nullptr); },
       TIDEPOOL_NOT_FOUND, "device 3"},
      {"tidepool_stats_json",
       [&] { return tidepool_stats_json(0, nullptr, small, sizeof small, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "too small"},
      {"tidepool_stats_json", [&] { return tidepool_stats_json(0, nullptr, nullptr, 5, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "buffer is NULL"},
      {"tidepool_snapshot_json",
       [&] { return tidepool_snapshot_json(0, &never, json, sizeof json, nullptr); },
       TIDEPOOL_NOT_FOUND, "never had"},
      {"tidepool_snapshot_json",
       [&] { return tidepool_snapshot_json(0, nullptr, small, sizeof small, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "too small"},
      {"tidepool_create_callback_pool",
       [&] { return tidepool_create_callback_pool(0, never, nullptr, FreeSegment, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "alloc_segment is NULL"},
      {"tidepool_create_callback_pool",
       [&] { return tidepool_create_callback_pool(0, never, AllocateSegment, nullptr, nullptr); },
       TIDEPOOL_INVALID_ARGUMENT, "free_segment is NULL"},
      {"tidepool_create_callback_pool",
       [] {
         return tidepool_create_callback_pool(0, kDefaultPool, AllocateSegment, FreeSegment,
                                              nullptr);
       },
       TIDEPOOL_INVALID_ARGUMENT, "default pool"},
      {"tidepool_create_callback_pool",
       [&] {
         return tidepool_create_callback_pool(0, released, AllocateSegment, FreeSegment, nullptr);
       },
       TIDEPOOL_FAILED_PRECONDITION, "already"},
      {"tidepool_create_callback_pool",
       [&] {
         return tidepool_create_callback_pool(4, never, AllocateSegment, FreeSegment, nullptr);
       },
       TIDEPOOL_NOT_FOUND, "device 4"},
      {"tidepool_init_simulated", [] { return tidepool_init_simulated(1, 1 << 30); },
       TIDEPOOL_FAILED_PRECONDITION, "exists already"},
      // A capture needs the ordinal's device with streams and graphs (Runtime::GraphDeviceOf).
      {"tidepool_capture_begin",
       [&] {
         tidepool_capture* capture = nullptr;
         return tidepool_capture_begin(3, stream, nullptr, TIDEPOOL_CAPTURE_MODE_GLOBAL, &capture);
       },
       TIDEPOOL_NOT_FOUND, "device 3"},
      {"tidepool_capture_begin",
       [&] {
         tidepool_capture* capture = nullptr;
         return tidepool_capture_begin(-1, stream, nullptr, TIDEPOOL_CAPTURE_MODE_GLOBAL,
                                       &capture);
       },
       TIDEPOOL_INVALID_ARGUMENT, "device -1"},
  };

  const std::vector<tidepool_pool_id> pools = {kDefaultPool, released, routed, never};
  CheckMisuses(misuses, pools);

  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(1, routed));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(1, routed));
  TIDEPOOL_REQUIRE_OK(tidepool_free(live));
  REQUIRE(InfoOf(1, routed).released);
}

TEST_CASE("out of memory names the request and leaves nothing reserved") {
  StartSimulatedRuntime();
  TIDEPOOL_REQUIRE_OK(tidepool_empty_cache(0));
  const int64_t reserved_before = PoolsOf(0).allocator()->GetStats().reserved_bytes.current;
  void* block = &block;
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_OUT_OF_MEMORY,
                          tidepool_malloc(&block, size_t{3} << 30, 0, nullptr));
  CHECK(block == nullptr);
  const std::string message = tidepool_last_error();
  INFO(message);
  CHECK(message.rfind("tidepool_malloc: ", 0) == 0);
  CHECK(message.find("3221225472") != std::string::npos);
  CHECK(PoolsOf(0).allocator()->GetStats().reserved_bytes.current == reserved_before);
}

TEST_CASE("a failed call leaves the last message; a successful one keeps it") {
  StartSimulatedRuntime();
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_NOT_FOUND, tidepool_empty_cache(5));
  const std::string failed = tidepool_last_error();
  TIDEPOOL_REQUIRE_OK(tidepool_empty_cache(0));
  CHECK(std::string(tidepool_last_error()) == failed);
}

}  // namespace
}  // namespace tidepool
