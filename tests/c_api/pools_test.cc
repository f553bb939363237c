// The pool primitives through the C API, with threads: sglang's pattern (begin -> malloc -> end
// -> release on one thread while another allocates in the default pool), nesting, the stream
// and everyone filters and the newest-first rule, a thread that exits while routed, blocks
// returning to their own pool, and error messages that stay with the thread that failed.
//
// Worker threads never call Catch2 (it is not thread safe): they count what went wrong, and the
// test thread checks the counts after joining them.
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "tests/c_api/c_api_test_util.h"

namespace tidepool {
namespace {

using c_api_test::InfoOf;
using c_api_test::NewPoolId;
using c_api_test::NewStream;
using c_api_test::PoolOf;
using c_api_test::SamePool;
using c_api_test::StartSimulatedRuntime;
using c_api_test::StatsOf;

constexpr tidepool_pool_id kDefaultPool = {0, 0};

// What a worker thread saw go wrong.
struct WorkerErrors {
  std::atomic<int> failed_calls{0};
  std::atomic<int> wrong_pool{0};
  std::string first_message;  // written by the worker before it is joined
};

// Allocates and frees in a loop on its own stream until told to stop, checking that every block
// comes from the default pool.
void AllocateInDefaultPool(Stream stream, const std::atomic<bool>& stop, std::atomic<int>& rounds,
                           WorkerErrors& errors) {
  while (!stop.load() || rounds.load() < 100) {
    void* blocks[4] = {};
    for (int i = 0; i < 4; ++i) {
      if (tidepool_malloc(&blocks[i], 512u << i, 0, stream) != TIDEPOOL_OK) {
        if (errors.failed_calls++ == 0) errors.first_message = tidepool_last_error();
        continue;
      }
      int device = -1;
      tidepool_pool_id pool{1, 1};
      if (tidepool_pool_of(blocks[i], &device, &pool) != TIDEPOOL_OK || device != 0 ||
          !SamePool(pool, kDefaultPool)) {
        ++errors.wrong_pool;
      }
    }
    for (void* block : blocks) {
      if (block != nullptr && tidepool_free(block) != TIDEPOOL_OK) ++errors.failed_calls;
    }
    ++rounds;
  }
}

TEST_CASE(
    "sglang's pattern: begin, malloc, end, release on one thread while another thread "
    "allocates in the default pool") {
  StartSimulatedRuntime();
  const tidepool_pool_id pool = NewPoolId();
  Stream worker_stream = NewStream(0);
  std::atomic<bool> stop{false};
  std::atomic<int> rounds{0};
  WorkerErrors errors;
  std::thread worker(AllocateInDefaultPool, worker_stream, std::cref(stop), std::ref(rounds),
                     std::ref(errors));

  std::vector<void*> inside;
  for (int round = 0; round < 20; ++round) {
    TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, pool));
    for (size_t bytes : {1000u, 70000u, 3u << 20}) {
      void* block = nullptr;
      TIDEPOOL_REQUIRE_OK(tidepool_malloc(&block, bytes, 0, nullptr));
      inside.push_back(block);
    }
    TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, pool));
    void* outside = nullptr;
    TIDEPOOL_REQUIRE_OK(tidepool_malloc(&outside, 1000, 0, nullptr));
    CHECK(SamePool(PoolOf(outside), kDefaultPool));
    TIDEPOOL_REQUIRE_OK(tidepool_free(outside));
    // Each round's begin took a reference: the last release leaves the blocks live.
    TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, pool));
  }
  stop = true;
  worker.join();
  INFO("worker's first failure: " << errors.first_message);
  CHECK(errors.failed_calls == 0);
  CHECK(errors.wrong_pool == 0);
  CHECK(rounds >= 100);

  PoolInfo info = InfoOf(0, pool);
  CHECK(info.released);
  CHECK(info.references == 0);
  CHECK(info.live_blocks == static_cast<int64_t>(inside.size()));
  CHECK(StatsOf(0, pool).reserved_bytes.current > 0);
  for (void* block : inside) {
    CHECK(SamePool(PoolOf(block), pool));
    TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  }
  // The last free took the pool's memory back.
  CHECK(StatsOf(0, pool).reserved_bytes.current == 0);
  CHECK(InfoOf(0, pool).live_blocks == 0);
}

TEST_CASE("the same thread entering the same pool again nests") {
  StartSimulatedRuntime();
  const tidepool_pool_id pool = NewPoolId();
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, pool));
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, pool));
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, pool));
  void* block = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&block, 1000, 0, nullptr));
  CHECK(SamePool(PoolOf(block), pool));
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, pool));
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_FAILED_PRECONDITION, tidepool_end_allocate_to_pool(0, pool));
  CHECK(InfoOf(0, pool).references == 2);
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, pool));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, pool));
  TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  CHECK(StatsOf(0, pool).reserved_bytes.current == 0);
}

TEST_CASE("a stream route sends that stream's allocations, from every thread, to the pool") {
  StartSimulatedRuntime();
  const tidepool_pool_id pool = NewPoolId();
  Stream routed = NewStream(1);
  Stream other = NewStream(1);
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_to_pool(
      1, pool, TIDEPOOL_ROUTE_STREAM, static_cast<uint64_t>(reinterpret_cast<uintptr_t>(routed))));

  void* on_routed = nullptr;
  void* on_other = nullptr;
  void* from_thread = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&on_routed, 1000, 1, routed));
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&on_other, 1000, 1, other));
  tidepool_status thread_status = TIDEPOOL_INTERNAL;
  std::thread([&] { thread_status = tidepool_malloc(&from_thread, 1000, 1, routed); }).join();
  REQUIRE(thread_status == TIDEPOOL_OK);
  CHECK(SamePool(PoolOf(on_routed), pool));
  CHECK(SamePool(PoolOf(on_other), kDefaultPool));
  CHECK(SamePool(PoolOf(from_thread), pool));

  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(1, pool));
  void* after_end = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&after_end, 1000, 1, routed));
  CHECK(SamePool(PoolOf(after_end), kDefaultPool));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(1, pool));
  for (void* block : {on_routed, on_other, from_thread, after_end}) {
    TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  }
}

TEST_CASE("routing is searched newest first, across filters") {
  StartSimulatedRuntime();
  const tidepool_pool_id mine = NewPoolId();
  const tidepool_pool_id everyone = NewPoolId();
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, mine));
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_to_pool(0, everyone, TIDEPOOL_ROUTE_EVERYONE, 0));

  void* newest = nullptr;
  void* other_thread = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&newest, 1000, 0, nullptr));
  tidepool_status thread_status = TIDEPOOL_INTERNAL;
  std::thread([&] { thread_status = tidepool_malloc(&other_thread, 1000, 0, nullptr); }).join();
  REQUIRE(thread_status == TIDEPOOL_OK);
  CHECK(SamePool(PoolOf(newest), everyone));
  CHECK(SamePool(PoolOf(other_thread), everyone));

  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, everyone));
  void* after = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&after, 1000, 0, nullptr));
  CHECK(SamePool(PoolOf(after), mine));
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, mine));

  // A block goes back to its own pool, whatever routing is active when it is freed.
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, everyone));
  const int64_t mine_live = StatsOf(0, mine).active_blocks.current;
  TIDEPOOL_REQUIRE_OK(tidepool_free(after));
  CHECK(StatsOf(0, mine).active_blocks.current == mine_live - 1);
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, everyone));

  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, mine));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, everyone));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, everyone));
  TIDEPOOL_REQUIRE_OK(tidepool_free(newest));
  TIDEPOOL_REQUIRE_OK(tidepool_free(other_thread));
  CHECK(StatsOf(0, mine).reserved_bytes.current == 0);
  CHECK(StatsOf(0, everyone).reserved_bytes.current == 0);
}

TEST_CASE("a thread that exits while routed ends its route and drops its reference") {
  StartSimulatedRuntime();
  const tidepool_pool_id pool = NewPoolId();
  void* block = nullptr;
  tidepool_status begun = TIDEPOOL_INTERNAL;
  tidepool_status allocated = TIDEPOOL_INTERNAL;
  std::thread([&] {
    begun = tidepool_begin_allocate_current_thread_to_pool(0, pool);
    allocated = tidepool_malloc(&block, 1000, 0, nullptr);
  }).join();
  REQUIRE(begun == TIDEPOOL_OK);
  REQUIRE(allocated == TIDEPOOL_OK);

  PoolInfo info = InfoOf(0, pool);
  CHECK(info.routes == 0);
  CHECK(info.references == 0);
  CHECK(info.live_blocks == 1);
  CHECK(SamePool(PoolOf(block), pool));
  TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  CHECK(StatsOf(0, pool).reserved_bytes.current == 0);
}

TEST_CASE("error messages belong to the thread whose call failed") {
  StartSimulatedRuntime();
  TIDEPOOL_REQUIRE_STATUS(TIDEPOOL_NOT_FOUND, tidepool_empty_cache(9));
  const std::string main_message = tidepool_last_error();

  // Both threads fail, then both read their message once the other has failed too.
  std::atomic<int> failed{0};
  std::string foreign_free_message;
  std::string unknown_device_message;
  std::string fresh_thread_message = "unset";
  auto fail_then_read = [&failed](std::string* message, auto failing_call) {
    failing_call();
    ++failed;
    while (failed.load() < 2) std::this_thread::yield();
    *message = tidepool_last_error();
  };
  int foreign = 0;
  std::thread first(fail_then_read, &foreign_free_message, [&] { tidepool_free(&foreign); });
  std::thread second(fail_then_read, &unknown_device_message, [] {
    tidepool_begin_allocate_current_thread_to_pool(6, {0, 1});
  });
  first.join();
  second.join();
  std::thread([&] { fresh_thread_message = tidepool_last_error(); }).join();

  CHECK(foreign_free_message.rfind("tidepool_free: ", 0) == 0);
  CHECK(foreign_free_message.find("not allocated by tidepool") != std::string::npos);
  CHECK(unknown_device_message.rfind("tidepool_begin_allocate_current_thread_to_pool: ", 0) == 0);
  CHECK(unknown_device_message.find("device 6") != std::string::npos);
  CHECK(fresh_thread_message.empty());
  CHECK(std::string(tidepool_last_error()) == main_message);
}

}  // namespace
}  // namespace tidepool
