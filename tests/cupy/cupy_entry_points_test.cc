// The CuPy entry points (integrations/cupy/tidepool_cupy.h) on two simulated devices: what a
// cupy.cuda.memory.CFunctionAllocator gets from them. Blocks come from the device CuPy names and
// the stream in `param`; every failure gives NULL with the code in tidepool_cupy_last_status()
// (per thread) and tidepool's message; frees return the memory and report bad pointers.
#include <cstdint>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "allocator/device.h"
#include "allocator/graph_device.h"
#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "integrations/cupy/tidepool_cupy.h"
#include "runtime/global_runtime.h"
#include "runtime/runtime.h"

namespace {

constexpr size_t kMiB = size_t{1} << 20;
constexpr size_t kDeviceBytes = size_t{1} << 30;

void Start() {
  static const tidepool_status started = tidepool_init_simulated(2, kDeviceBytes);
  INFO("tidepool_init_simulated: " << tidepool_last_error());
  REQUIRE(started == TIDEPOOL_OK);
}

// A field of tidepool_stats_json's text: "\"allocated_bytes\":{\"current\":N" and the like.
uint64_t StatCurrent(int device, const std::string& field) {
  char json[1 << 14];
  size_t needed = 0;
  REQUIRE(tidepool_stats_json(device, nullptr, json, sizeof(json), &needed) == TIDEPOOL_OK);
  const std::string text(json);
  const std::string key = "\"" + field + "\":{\"current\":";
  const size_t at = text.find(key);
  INFO(text);
  REQUIRE(at != std::string::npos);
  return std::stoull(text.substr(at + key.size()));
}

tidepool::Stream NewStream(int device) {
  absl::StatusOr<tidepool::Runtime*> runtime = tidepool::GlobalRuntime();
  REQUIRE(runtime.ok());
  absl::StatusOr<tidepool::GraphDevice*> graph_device = (*runtime)->GraphDeviceOf(device);
  REQUIRE(graph_device.ok());
  absl::StatusOr<tidepool::Stream> stream = (*graph_device)->CreateStream();
  REQUIRE(stream.ok());
  return *stream;
}

TEST_CASE("malloc gives a block of the device CuPy names, and free returns it") {
  Start();
  for (int device : {0, 1}) {
    const uint64_t before = StatCurrent(device, "allocated_bytes");
    void* ptr = tidepool_cupy_malloc(nullptr, 3 * kMiB + 1000, device);
    INFO(tidepool_last_error());
    REQUIRE(ptr != nullptr);
    CHECK(tidepool_cupy_last_status() == TIDEPOOL_OK);
    CHECK(reinterpret_cast<uintptr_t>(ptr) % 512 == 0);
    int owner = -1;
    tidepool_pool_id pool{};
    REQUIRE(tidepool_pool_of(ptr, &owner, &pool) == TIDEPOOL_OK);
    CHECK(owner == device);
    CHECK(StatCurrent(device, "allocated_bytes") >= before + 3 * kMiB + 1000);
    tidepool_cupy_free(nullptr, ptr, device);
    CHECK(tidepool_cupy_last_status() == TIDEPOOL_OK);
    CHECK(StatCurrent(device, "allocated_bytes") == before);
  }
}

TEST_CASE("param is the stream: a block is reused on its own stream, not on another") {
  Start();
  tidepool::Stream stream = NewStream(0);
  void* first = tidepool_cupy_malloc(stream, 4 * kMiB, 0);
  INFO(tidepool_last_error());
  REQUIRE(first != nullptr);
  tidepool_cupy_free(stream, first, 0);
  // Freed on `stream` with nothing queued: the next request of the size on it gets it back.
  void* again = tidepool_cupy_malloc(stream, 4 * kMiB, 0);
  REQUIRE(again == first);
  // While it is live, the legacy default stream gets another block, and once it is freed on
  // `stream`, the default stream still does not take it (it belongs to `stream`'s cache).
  void* other = tidepool_cupy_malloc(nullptr, 4 * kMiB, 0);
  REQUIRE(other != nullptr);
  CHECK(other != first);
  tidepool_cupy_free(stream, again, 0);
  void* third = tidepool_cupy_malloc(nullptr, 4 * kMiB, 0);
  REQUIRE(third != nullptr);
  CHECK(third != first);
  tidepool_cupy_free(nullptr, other, 0);
  tidepool_cupy_free(nullptr, third, 0);
  CHECK(StatCurrent(0, "allocated_bytes") == 0);
}

TEST_CASE("a stream tidepool does not know gives NULL and INVALID_ARGUMENT") {
  Start();
  void* ptr = tidepool_cupy_malloc(reinterpret_cast<void*>(uintptr_t{0xdead0}), kMiB, 0);
  CHECK(ptr == nullptr);
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_INVALID_ARGUMENT);
}

TEST_CASE("out of memory gives NULL, OUT_OF_MEMORY and tidepool's message") {
  Start();
  void* ptr = tidepool_cupy_malloc(nullptr, 2 * kDeviceBytes, 0);
  CHECK(ptr == nullptr);
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_OUT_OF_MEMORY);
  CHECK(std::string(tidepool_last_error()).find("tidepool_malloc") != std::string::npos);
  // A success afterwards resets the status.
  void* ok = tidepool_cupy_malloc(nullptr, 512, 0);
  REQUIRE(ok != nullptr);
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_OK);
  tidepool_cupy_free(nullptr, ok, 0);
}

TEST_CASE("an unknown device and a size of 0 give NULL with their codes") {
  Start();
  CHECK(tidepool_cupy_malloc(nullptr, kMiB, 7) == nullptr);
  CHECK(tidepool_cupy_last_status() != TIDEPOOL_OK);
  CHECK(tidepool_cupy_malloc(nullptr, 0, 0) == nullptr);
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_INVALID_ARGUMENT);
}

TEST_CASE("a bad free changes nothing and sets the status; NULL does nothing") {
  Start();
  void* live = tidepool_cupy_malloc(nullptr, kMiB, 1);
  REQUIRE(live != nullptr);
  const uint64_t allocated = StatCurrent(1, "allocated_bytes");
  int foreign = 0;
  tidepool_cupy_free(nullptr, &foreign, 1);
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_INVALID_ARGUMENT);
  tidepool_cupy_free(nullptr, nullptr, 1);
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_OK);
  tidepool_cupy_free(nullptr, live, 1);
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_OK);
  tidepool_cupy_free(nullptr, live, 1);  // double free
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_FAILED_PRECONDITION);
  CHECK(StatCurrent(1, "allocated_bytes") == allocated - kMiB);
}

TEST_CASE("the status is per thread") {
  Start();
  CHECK(tidepool_cupy_malloc(nullptr, 2 * kDeviceBytes, 0) == nullptr);
  REQUIRE(tidepool_cupy_last_status() == TIDEPOOL_OUT_OF_MEMORY);
  tidepool_status seen = TIDEPOOL_INTERNAL;
  std::thread([&seen] { seen = tidepool_cupy_last_status(); }).join();
  CHECK(seen == TIDEPOOL_OK);
  CHECK(tidepool_cupy_last_status() == TIDEPOOL_OUT_OF_MEMORY);
}

}  // namespace
