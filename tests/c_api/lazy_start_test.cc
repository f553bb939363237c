// The C API's lazy start: with no init, the first call makes the runtime from the CUDA devices.
// Here the driver is pointed at a file that does not exist (TIDEPOOL_LIBCUDA), so that start
// fails on every machine: the call returns UNAVAILABLE with the driver's reason and the way
// out, the next call tries again, and tidepool_init_simulated still works afterwards. Then
// starts racing from many threads: exactly one wins, the rest see the runtime it made.
#include <atomic>
#include <cstdlib>
#include <string>
#include <thread>
#include <vector>

#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "tests/c_api/c_api_test_util.h"

namespace tidepool {
namespace {

TEST_CASE("a failed lazy start is reported, retried, and leaves init possible") {
  REQUIRE(setenv("TIDEPOOL_LIBCUDA", "/nonexistent/libcuda.so.1", 1) == 0);
  void* block = &block;
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_UNAVAILABLE, tidepool_malloc(&block, 1000, 0, nullptr));
  CHECK(block == nullptr);
  const std::string message = tidepool_last_error();
  INFO(message);
  CHECK(message.rfind("tidepool_malloc: ", 0) == 0);
  CHECK(message.find("/nonexistent/libcuda.so.1") != std::string::npos);
  CHECK(message.find("tidepool_init_simulated") != std::string::npos);
  int count = 0;
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_UNAVAILABLE, tidepool_device_count(&count));

  // Threads race to start; exactly one succeeds.
  constexpr int kThreads = 8;
  std::atomic<int> ready{0};
  std::atomic<int> started{0};
  std::atomic<int> refused{0};
  std::atomic<int> allocated{0};
  std::vector<std::thread> threads;
  for (int i = 0; i < kThreads; ++i) {
    threads.emplace_back([&] {
      ++ready;
      while (ready.load() < kThreads) std::this_thread::yield();
      const tidepool_status status = tidepool_init_simulated(1, size_t{1} << 30);
      if (status == TIDEPOOL_OK) ++started;
      if (status == TIDEPOOL_FAILED_PRECONDITION) ++refused;
      void* mine = nullptr;
      if (tidepool_malloc(&mine, 1000, 0, nullptr) == TIDEPOOL_OK &&
          tidepool_free(mine) == TIDEPOOL_OK) {
        ++allocated;
      }
    });
  }
  for (std::thread& thread : threads) thread.join();
  CHECK(started == 1);
  CHECK(refused == kThreads - 1);
  CHECK(allocated == kThreads);
  TIDEPOOL_REQUIRE_OK(tidepool_device_count(&count));
  CHECK(count == 1);
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&block, 1000, 0, nullptr));
  TIDEPOOL_REQUIRE_OK(tidepool_free(block));
}

}  // namespace
}  // namespace tidepool
