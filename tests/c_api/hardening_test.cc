// Regression tests for the defects an adversarial run of the C API found (each fails without its
// fix), on the simulated devices every C API test binary starts:
//
//   * a block handed out by growth is found by free and pool_of at once, under threads;
//   * two devices never hand out the same address, however often one grows and empties;
//   * tidepool works from thread_local destructors at thread exit: routed mallocs, failed calls,
//     begins (whose routes thread exit then ends);
//   * a segment callback that calls tidepool gets an error instead of a deadlock;
//   * a pool released while another thread allocates into it never hands out a block once gone,
//     and gone pools hold no memory;
//   * sglang's own call order inside a capture (end the capture's route by hand, use its pool,
//     resume with a begin) ends with a good graph and balanced references;
//   * a failed capture_begin changes nothing; a double free after empty_cache says what it may be.
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "pool/pool_manager.h"
#include "tests/c_api/c_api_test_util.h"

namespace tidepool {
namespace {

using c_api_test::GraphDeviceOf;
using c_api_test::InfoOf;
using c_api_test::NewPoolId;
using c_api_test::NewStream;
using c_api_test::PoolOf;
using c_api_test::PoolsOf;
using c_api_test::SamePool;
using c_api_test::Simulated;
using c_api_test::StartSimulatedRuntime;
using c_api_test::StatsOf;

constexpr size_t kMiB = size_t{1} << 20;

void* Malloc(size_t bytes, int device = 0, void* stream = nullptr) {
  void* block = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_malloc(&block, bytes, device, stream));
  return block;
}

// --- Growth publishes a segment to the page map before any block of it can be taken ----------

// Host memory for a callback pool (plain segments, each grown under the device lock).
std::atomic<int64_t> host_segments{0};
void* HostAllocate(size_t size, int, void*) {
  ++host_segments;
  return std::aligned_alloc(512, (size + 511) / 512 * 512);
}
void HostFree(void* ptr, size_t, int, void*) {
  --host_segments;
  std::free(ptr);
}

TEST_CASE("a block from a fresh segment is found by free and pool_of, whatever thread took it") {
  StartSimulatedRuntime();
  const tidepool_pool_id pool = NewPoolId();
  TIDEPOOL_REQUIRE_OK(tidepool_create_callback_pool(0, pool, HostAllocate, HostFree, nullptr));
  // Every thread on the NULL stream: one shard, so a thread's fast path can take the block of a
  // segment another thread has just grown. 512 KiB blocks: four to a 2 MiB segment.
  constexpr int kThreads = 6;
  constexpr int kRounds = 300;
  std::atomic<int> failures{0};
  std::string first_failure;
  std::atomic<bool> noted{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back([&] {
      auto fail = [&](const char* what) {
        ++failures;
        if (!noted.exchange(true)) first_failure = absl::StrCat(what, ": ", tidepool_last_error());
      };
      if (tidepool_begin_allocate_current_thread_to_pool(0, pool) != TIDEPOOL_OK) return fail("begin");
      for (int round = 0; round < kRounds; ++round) {
        std::vector<void*> held;
        for (int i = 0; i < 8; ++i) {
          void* block = nullptr;
          if (tidepool_malloc(&block, 512 * 1024, 0, nullptr) != TIDEPOOL_OK) return fail("malloc");
          int device = -1;
          tidepool_pool_id of{};
          if (tidepool_pool_of(block, &device, &of) != TIDEPOOL_OK || !SamePool(of, pool)) {
            return fail("pool_of");
          }
          held.push_back(block);
        }
        for (void* block : held) {
          if (tidepool_free(block) != TIDEPOOL_OK) return fail("free");
        }
        if (round % 16 == 0 && tidepool_trim_pool(0, pool) != TIDEPOOL_OK) return fail("trim");
      }
      if (tidepool_end_allocate_to_pool(0, pool) != TIDEPOOL_OK) return fail("end");
      if (tidepool_release_pool(0, pool) != TIDEPOOL_OK) fail("release");
    });
  }
  for (std::thread& thread : threads) thread.join();
  INFO(first_failure);
  CHECK(failures.load() == 0);
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, pool));
  CHECK(InfoOf(0, pool).gone);
  CHECK(host_segments.load() == 0);
}

// --- Devices keep to their own addresses -------------------------------------------------------

TEST_CASE("a device that grows and empties its cache for ever never reaches another's addresses") {
  StartSimulatedRuntime();
  // A block of device 1, live throughout, somewhere near the start of device 1's addresses.
  void* on_one = Malloc(2 * kMiB, 1);
  // Each round on device 0 reserves a fresh range as large as the device (2 MiB is a large
  // request) and gives it back, walking through device 0's addresses. Once they are used up it
  // must come back to its own lowest free ones (the address goes down), never walk on into
  // device 1's. The distance between two devices' spaces is 2^48 bytes: the bound lets a walk
  // that never turns back go past device 1's first addresses.
  const size_t max_rounds = (size_t{1} << 48) / c_api_test::kBytesPerDevice + 64;
  uintptr_t previous = 0;
  size_t rounds_after_turning = 0;
  for (size_t round = 0; round < max_rounds && rounds_after_turning < 64; ++round) {
    void* on_zero = nullptr;
    const tidepool_status status = tidepool_malloc(&on_zero, 2 * kMiB, 0, nullptr);
    int device = -1;
    tidepool_pool_id pool{};
    const tidepool_status of = tidepool_pool_of(on_one, &device, &pool);
    if (status != TIDEPOOL_OK || on_zero == on_one || of != TIDEPOOL_OK || device != 1) {
      INFO("round " << round << ": malloc " << tidepool_status_name(status) << ", pool_of "
                    << tidepool_status_name(of) << " device " << device << ": "
                    << tidepool_last_error());
      REQUIRE(status == TIDEPOOL_OK);
      REQUIRE(on_zero != on_one);
      REQUIRE(of == TIDEPOOL_OK);
      REQUIRE(device == 1);
    }
    const uintptr_t address = reinterpret_cast<uintptr_t>(on_zero);
    if (rounds_after_turning > 0 || address < previous) ++rounds_after_turning;
    previous = address;
    REQUIRE(tidepool_free(on_zero) == TIDEPOOL_OK);
    REQUIRE(tidepool_empty_cache(0) == TIDEPOOL_OK);
  }
  CHECK(rounds_after_turning == 64);  // it did come back to its own addresses
  TIDEPOOL_REQUIRE_OK(tidepool_free(on_one));
}

// --- Thread exit ------------------------------------------------------------------------------

// What the destructor below saw, for the test to check after the thread is gone.
struct ExitReport {
  tidepool_status routed_malloc = TIDEPOOL_INTERNAL;
  tidepool_status routed_free = TIDEPOOL_INTERNAL;
  tidepool_status failed_call = TIDEPOOL_OK;
  std::string failed_message;
  tidepool_status begin = TIDEPOOL_INTERNAL;
  tidepool_pool_id routed_to{};
};
ExitReport exit_report;
tidepool_pool_id exit_pool{};

// A program's thread_local whose destructor calls tidepool, as a runtime freeing its tensors at
// thread exit does. Made before tidepool's own thread state, so destroyed after it would be.
struct CallsTidepoolAtExit {
  bool armed = false;
  ~CallsTidepoolAtExit() {
    if (!armed) return;
    void* block = nullptr;
    exit_report.routed_malloc = tidepool_malloc(&block, 4096, 0, nullptr);
    if (block != nullptr) {
      exit_report.routed_to = PoolOfOrDefault(block);
      exit_report.routed_free = tidepool_free(block);
    }
    exit_report.failed_call = tidepool_free(&exit_report);  // not tidepool's: fails
    exit_report.failed_message = tidepool_last_error();
    exit_report.begin = tidepool_begin_allocate_current_thread_to_pool(0, exit_pool);
  }
  static tidepool_pool_id PoolOfOrDefault(void* block) {
    int device = -1;
    tidepool_pool_id pool{};
    tidepool_pool_of(block, &device, &pool);
    return pool;
  }
};
thread_local CallsTidepoolAtExit calls_at_exit;

TEST_CASE("tidepool works from thread_local destructors at thread exit") {
  StartSimulatedRuntime();
  exit_pool = NewPoolId();
  const tidepool_pool_id everyone = NewPoolId();
  // An everyone-route: the routed malloc reads the thread's snapshot of global routes.
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_to_pool(0, everyone, TIDEPOOL_ROUTE_EVERYONE, 0));
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, exit_pool));
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, exit_pool));  // exit_pool: 1 reference
  std::thread thread([] {
    calls_at_exit.armed = true;  // constructed first, so destroyed last
    void* block = nullptr;
    tidepool_malloc(&block, 512, 0, nullptr);  // tidepool's thread state, made after it
    tidepool_free(block);
    tidepool_free(&block);  // a failure: the thread's last error exists too
  });
  thread.join();
  CHECK(exit_report.routed_malloc == TIDEPOOL_OK);
  CHECK(exit_report.routed_free == TIDEPOOL_OK);
  CHECK(SamePool(exit_report.routed_to, everyone));
  CHECK(exit_report.failed_call == TIDEPOOL_INVALID_ARGUMENT);
  CHECK(exit_report.failed_message.rfind("tidepool_free: ", 0) == 0);
  CHECK(exit_report.begin == TIDEPOOL_OK);
  // The route begun in the destructor was ended, and its reference dropped, when the thread
  // finished exiting: the pool is back to the one reference it had.
  const PoolInfo info = InfoOf(0, exit_pool);
  CHECK(info.routes == 0);
  CHECK(info.references == 1);
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, exit_pool));
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, everyone));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, everyone));
}

// --- Callbacks that call tidepool ------------------------------------------------------------

std::atomic<int> reentrant_calls{0};
std::atomic<int> reentrant_refusals{0};
std::string reentrant_message;
void* ReentrantAllocate(size_t size, int device, void*) {
  char json[4096];
  size_t needed = 0;
  ++reentrant_calls;
  if (tidepool_stats_json(device, nullptr, json, sizeof(json), &needed) ==
      TIDEPOOL_FAILED_PRECONDITION) {
    ++reentrant_refusals;
    reentrant_message = tidepool_last_error();
  }
  void* nested = nullptr;
  if (tidepool_malloc(&nested, 512, device, nullptr) == TIDEPOOL_FAILED_PRECONDITION &&
      nested == nullptr) {
    ++reentrant_refusals;
  }
  return std::aligned_alloc(512, size);
}
void ReentrantFree(void* ptr, size_t, int device, void*) {
  ++reentrant_calls;
  if (tidepool_empty_cache(device) == TIDEPOOL_FAILED_PRECONDITION) ++reentrant_refusals;
  std::free(ptr);
}

TEST_CASE("a segment callback that calls tidepool is refused, not deadlocked") {
  StartSimulatedRuntime();
  const tidepool_pool_id pool = NewPoolId();
  TIDEPOOL_REQUIRE_OK(
      tidepool_create_callback_pool(1, pool, ReentrantAllocate, ReentrantFree, nullptr));
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(1, pool));
  void* block = Malloc(kMiB, 1);
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(1, pool));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(1, pool));  // the begin's reference
  TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(1, pool));  // the last: gives the segment back
  CHECK(reentrant_calls.load() == 2);
  CHECK(reentrant_refusals.load() == 3);
  CHECK(reentrant_message.rfind("tidepool_stats_json: called from inside a pool's segment "
                                "callback",
                                0) == 0);
  CHECK(InfoOf(1, pool).gone);
  // Outside a callback the same calls work.
  char json[4096];
  TIDEPOOL_REQUIRE_OK(tidepool_stats_json(1, nullptr, json, sizeof(json), nullptr));
}

// --- Release racing an allocation ------------------------------------------------------------

TEST_CASE("a pool released while another thread allocates into it hands out nothing once gone") {
  StartSimulatedRuntime();
  constexpr int kPools = 1500;
  std::atomic<bool> stop{false};
  std::atomic<int64_t> from_gone{0};
  std::atomic<int64_t> allocated{0};
  PoolManager& manager = PoolsOf(1);
  std::thread allocator([&] {
    std::vector<void*> held;
    while (!stop.load()) {
      void* block = nullptr;
      if (tidepool_malloc(&block, 64 * 1024, 1, nullptr) == TIDEPOOL_OK) {
        ++allocated;
        int device = -1;
        tidepool_pool_id pool{};
        if (tidepool_pool_of(block, &device, &pool) == TIDEPOOL_OK && (pool.first | pool.second) &&
            manager.Info(PoolId{pool.first, pool.second})->gone) {
          ++from_gone;
        }
        held.push_back(block);
      }
      if (held.size() > 64) {
        for (void* old : held) tidepool_free(old);
        held.clear();
      }
    }
    for (void* old : held) tidepool_free(old);
  });
  std::vector<tidepool_pool_id> pools;
  for (int i = 0; i < kPools; ++i) {
    const tidepool_pool_id pool = NewPoolId();
    pools.push_back(pool);
    REQUIRE(tidepool_begin_allocate_to_pool(1, pool, TIDEPOOL_ROUTE_EVERYONE, 0) == TIDEPOOL_OK);
    // Let the other thread allocate at least once while the route stands, so that its next
    // allocation races the release.
    const int64_t seen = allocated.load();
    for (int spin = 0; allocated.load() == seen && spin < 1000000; ++spin) {
      std::this_thread::yield();
    }
    REQUIRE(tidepool_end_allocate_to_pool(1, pool) == TIDEPOOL_OK);
    REQUIRE(tidepool_release_pool(1, pool) == TIDEPOOL_OK);
  }
  stop = true;
  allocator.join();
  CHECK(allocated.load() >= kPools);
  CHECK(from_gone.load() == 0);
  // Every block is freed: each pool is gone, and holds no memory.
  int64_t holding = 0;
  for (const tidepool_pool_id& pool : pools) {
    const PoolInfo info = InfoOf(1, pool);
    CHECK(info.gone);
    if (StatsOf(1, pool).reserved_bytes.current != 0) ++holding;
  }
  CHECK(holding == 0);
}

// --- sglang's call order inside a capture -----------------------------------------------------

// A capture of `stream` on device 0 into a new private pool, whose id goes to *pool.
tidepool_capture* BeginPrivateCapture(Stream stream, tidepool_pool_id* pool) {
  tidepool_capture* capture = nullptr;
  TIDEPOOL_REQUIRE_OK(
      tidepool_capture_begin(0, stream, nullptr, TIDEPOOL_CAPTURE_MODE_GLOBAL, &capture));
  TIDEPOOL_REQUIRE_OK(tidepool_capture_pool(capture, pool));
  return capture;
}

TEST_CASE("sglang's order: end a capture's route by hand, use another pool, resume; the capture "
          "still ends with its graph") {
  StartSimulatedRuntime();
  const Stream stream = NewStream(0);
  tidepool_pool_id graph_pool{};
  tidepool_capture* capture = BeginPrivateCapture(stream, &graph_pool);
  void* before_pause = Malloc(kMiB, 0, stream);
  CHECK(SamePool(PoolOf(before_pause), graph_pool));

  // SymmetricMemoryContext.__enter__ under capture: end the graph pool's route, begin its own.
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, graph_pool));
  const tidepool_pool_id symmetric = NewPoolId();
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, symmetric));
  void* buffer = Malloc(kMiB, 0, stream);
  CHECK(SamePool(PoolOf(buffer), symmetric));
  // __exit__: end and release its own, begin the graph pool again for this thread.
  TIDEPOOL_REQUIRE_OK(tidepool_end_allocate_to_pool(0, symmetric));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, symmetric));
  TIDEPOOL_REQUIRE_OK(tidepool_begin_allocate_current_thread_to_pool(0, graph_pool));
  void* after_resume = Malloc(kMiB, 0, stream);
  CHECK(SamePool(PoolOf(after_resume), graph_pool));

  tidepool_graph* graph = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_capture_end(capture, &graph));
  REQUIRE(graph != nullptr);
  // The resumed route was the capture's: it is gone, and so is the reference its begin took.
  // The graph holds the one reference left.
  PoolInfo info = InfoOf(0, graph_pool);
  CHECK(info.routes == 0);
  CHECK(info.references == 1);
  void* after_end = Malloc(kMiB, 0, stream);
  CHECK(SamePool(PoolOf(after_end), tidepool_pool_id{0, 0}));
  TIDEPOOL_REQUIRE_OK(tidepool_graph_launch(graph, stream));
  Simulated(0).CompleteAll();

  for (void* block : {before_pause, after_resume, after_end, buffer}) {
    TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  }
  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(graph));
  CHECK(InfoOf(0, graph_pool).gone);
  CHECK(InfoOf(0, symmetric).gone);
  REQUIRE(GraphDeviceOf(0).DestroyStream(stream).ok());
}

TEST_CASE("a capture whose route someone else ended, and nobody resumed, still ends") {
  StartSimulatedRuntime();
  const Stream stream = NewStream(0);
  tidepool_pool_id graph_pool{};
  tidepool_capture* capture = BeginPrivateCapture(stream, &graph_pool);
  tidepool_status ended = TIDEPOOL_INTERNAL;
  std::thread other([&] {
    // Another thread, with no route of its own, ends the pool's newest route: the capture's.
    ended = tidepool_end_allocate_to_pool(0, graph_pool);
  });
  other.join();
  REQUIRE(ended == TIDEPOOL_OK);
  tidepool_graph* graph = nullptr;
  TIDEPOOL_REQUIRE_OK(tidepool_capture_end(capture, &graph));
  CHECK(InfoOf(0, graph_pool).references == 1);
  TIDEPOOL_REQUIRE_OK(tidepool_graph_destroy(graph));
  CHECK(InfoOf(0, graph_pool).gone);
  REQUIRE(GraphDeviceOf(0).DestroyStream(stream).ok());
}

// --- Contracts --------------------------------------------------------------------------------

TEST_CASE("a capture_begin that fails harvests nothing") {
  StartSimulatedRuntime();
  const Stream mine = NewStream(0);
  const Stream other = NewStream(0);
  void* block = Malloc(kMiB, 0, mine);
  TIDEPOOL_REQUIRE_OK(tidepool_record_stream(block, other));
  Simulated(0).Enqueue(other);
  TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  Simulated(0).CompleteAll();  // its event has completed, but nothing has looked
  const std::string before = PoolsOf(0).allocator()->SnapshotJson();
  REQUIRE(before.find("awaiting_events") != std::string::npos);
  tidepool_capture* capture = nullptr;
  CHECK(tidepool_capture_begin(0, nullptr, nullptr, TIDEPOOL_CAPTURE_MODE_GLOBAL, &capture) ==
        TIDEPOOL_INVALID_ARGUMENT);
  CHECK(capture == nullptr);
  CHECK(PoolsOf(0).allocator()->SnapshotJson() == before);
  // A shared pool the device never had, or one nothing holds, is refused before the mark too.
  tidepool_pool_id never{};
  TIDEPOOL_REQUIRE_OK(tidepool_new_graph_pool_id(&never));
  CHECK(tidepool_capture_begin(0, mine, &never, TIDEPOOL_CAPTURE_MODE_GLOBAL, &capture) ==
        TIDEPOOL_NOT_FOUND);
  tidepool_pool_id released{};
  TIDEPOOL_REQUIRE_OK(tidepool_graph_pool_create(0, &released));
  TIDEPOOL_REQUIRE_OK(tidepool_release_pool(0, released));
  CHECK(tidepool_capture_begin(0, mine, &released, TIDEPOOL_CAPTURE_MODE_GLOBAL, &capture) ==
        TIDEPOOL_FAILED_PRECONDITION);
  CHECK(capture == nullptr);
  CHECK(PoolsOf(0).allocator()->SnapshotJson() == before);
  void* again = Malloc(kMiB, 0, mine);  // harvests, and reuses it
  CHECK(again == block);
  TIDEPOOL_REQUIRE_OK(tidepool_free(again));
}

TEST_CASE("a double free after the memory went back to the device says what it may be") {
  StartSimulatedRuntime();
  void* block = Malloc(3 * kMiB, 1);
  TIDEPOOL_REQUIRE_OK(tidepool_free(block));
  TIDEPOOL_REQUIRE_OK(tidepool_empty_cache(1));
  CHECK(tidepool_free(block) == TIDEPOOL_INVALID_ARGUMENT);
  const std::string message = tidepool_last_error();
  CHECK(message.find("not allocated by tidepool") != std::string::npos);
  CHECK(message.find("gone back to the device since it was freed") != std::string::npos);
  CHECK(tidepool_record_stream(block, nullptr) == TIDEPOOL_INVALID_ARGUMENT);
}

}  // namespace
}  // namespace tidepool
