// Symmetric NCCL pools through the C API on a real GPU with the real NCCL and a one-rank
// communicator (tidepool.h, "Symmetric NCCL pools"; docs/nccl.md):
//   * a pool made with the communicator passed in, reserved, grown on demand; buffers from 4 KiB
//     to 256 MiB allocated with the ordinary tidepool_malloc while the thread is routed to it;
//     each lies in a registered window (tidepool_symmetric_lookup), and an out-of-place
//     ncclAllReduce between two pool buffers gives the right values;
//   * windows registered == segments held (the pool's stats), trim deregisters and frees every
//     segment, destroy ends the pool, and the device's free memory comes back;
//   * sglang's order inside a real CUDA graph capture: the capture's allocations go to its graph
//     pool, a symmetric begin sends this thread's to the symmetric pool (an all-reduce on them is
//     captured and replays correctly), a growth is refused without breaking the capture, and the
//     symmetric end gives the capture its routing back.
#include <nccl.h>

#include <cstdio>
#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "allocator/cuda_device.h"
#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "tests/gpu/c_api_checks.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/one_rank_nccl.h"

namespace tidepool {
namespace {

using gpu_test::CountMismatches;
using gpu_test::FillPattern;
using gpu_test::OneRank;
using gpu_test::RequireDevice;
using gpu_test::RequireFreeBytes;
using gpu_test::RequireOneRankCommunicator;
using gpu_test::RequireStream;
using gpu_test::StatField;
using gpu_test::StatsOf;

constexpr size_t kKiB = size_t{1} << 10;
constexpr size_t kMiB = size_t{1} << 20;

bool SamePool(tidepool_pool_id a, tidepool_pool_id b) {
  return a.first == b.first && a.second == b.second;
}

tidepool_pool_id PoolOf(void* ptr) {
  int device = -1;
  tidepool_pool_id pool{};
  REQUIRE_TP(tidepool_pool_of(ptr, &device, &pool));
  CHECK(device == 0);
  return pool;
}

void AllReduce(const OneRank& one, void* send, void* receive, size_t bytes, Stream stream) {
  REQUIRE(one.nccl
              ->Check(one.all_reduce(send, receive, bytes / 4, ncclUint32, ncclSum, one.comm,
                                     static_cast<cudaStream_t>(stream)),
                      "ncclAllReduce")
              .ok());
}

TEST_CASE("symmetric pool through the C API: windows, all-reduce from 4 KiB to 256 MiB, trim") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  REQUIRE(device->MakeCurrent().ok());
  Stream stream = RequireStream(*device);
  int devices = 0;
  REQUIRE_TP(tidepool_device_count(&devices));  // the runtime first: its own memory is not ours
  const size_t free_before = RequireFreeBytes(*device);
  const OneRank one = RequireOneRankCommunicator();
  const size_t free_with_comm = RequireFreeBytes(*device);

  tidepool_pool_id pool{};
  REQUIRE_TP(tidepool_symmetric_pool_create(0, one.comm, 64 * kMiB, 30.0, &pool));
  REQUIRE_TP(tidepool_symmetric_pool_reserve(0, pool, 64 * kMiB));
  tidepool_pool_id second{};
  CHECK(tidepool_symmetric_pool_create(0, one.comm, 0, 30.0, &second) ==
        TIDEPOOL_FAILED_PRECONDITION);  // one pool per communicator

  const std::vector<size_t> sizes = {4 * kKiB, kMiB, 16 * kMiB, 64 * kMiB, 256 * kMiB};
  std::vector<void*> sends;
  std::vector<void*> receives;
  REQUIRE_TP(tidepool_begin_allocate_current_thread_to_pool(0, pool));  // the ordinary begin
  for (size_t bytes : sizes) {
    void* send = nullptr;
    void* receive = nullptr;
    REQUIRE_TP(tidepool_malloc(&send, bytes, 0, stream));
    REQUIRE_TP(tidepool_malloc(&receive, bytes, 0, stream));
    sends.push_back(send);
    receives.push_back(receive);
  }
  REQUIRE_TP(tidepool_end_allocate_to_pool(0, pool));
  REQUIRE_TP(tidepool_release_pool(0, pool));
  void* ordinary = nullptr;
  REQUIRE_TP(tidepool_malloc(&ordinary, kMiB, 0, stream));
  CHECK(PoolOf(ordinary).first == 0);
  CHECK(PoolOf(ordinary).second == 0);

  for (size_t i = 0; i < sizes.size(); ++i) {
    CHECK(SamePool(PoolOf(sends[i]), pool));
    void* window = nullptr;
    size_t offset = 0;
    REQUIRE_TP(tidepool_symmetric_lookup(receives[i], &window, &offset));
    CHECK(window != nullptr);
    const uint32_t pattern = 0x11223344u + static_cast<uint32_t>(i);
    FillPattern(*device, reinterpret_cast<uintptr_t>(sends[i]), sizes[i], pattern, stream);
    FillPattern(*device, reinterpret_cast<uintptr_t>(receives[i]), sizes[i], 0, stream);
    AllReduce(one, sends[i], receives[i], sizes[i], stream);
    const size_t wrong =
        CountMismatches(*device, reinterpret_cast<uintptr_t>(receives[i]), sizes[i], pattern,
                        stream);
    std::printf("all-reduce of %zu bytes between pool buffers (receive at offset %zu): %zu "
                "wrong bytes\n",
                sizes[i], offset, wrong);
    CHECK(wrong == 0);
  }
  const std::string stats = StatsOf(0, pool);
  std::printf("symmetric pool stats: %s\n", stats.c_str());
  const long long segments = StatField(stats, "segments");
  CHECK(segments >= 3);  // the reserve and at least two growths (64 MiB and 256 MiB pairs)
  CHECK(StatField(stats, "device_allocations") - StatField(stats, "device_frees") == segments);
  CHECK(StatField(stats, "active_blocks") == 2 * static_cast<long long>(sizes.size()));
  std::vector<char> snapshot(1 << 16);
  REQUIRE_TP(tidepool_snapshot_json(0, &pool, snapshot.data(), snapshot.size(), nullptr));
  CHECK(std::strstr(snapshot.data(), "\"window\"") != nullptr);

  // A buffer of the pool cannot be record_stream'ed, and a trim with live buffers keeps them.
  CHECK(tidepool_record_stream(sends[0], stream) == TIDEPOOL_FAILED_PRECONDITION);
  CHECK(tidepool_symmetric_pool_destroy(0, pool) == TIDEPOOL_FAILED_PRECONDITION);
  for (size_t i = 0; i < sizes.size(); ++i) {
    REQUIRE_TP(tidepool_free(sends[i]));
    REQUIRE_TP(tidepool_free(receives[i]));
  }
  CHECK(tidepool_free(sends[0]) == TIDEPOOL_FAILED_PRECONDITION);  // a double free
  REQUIRE_TP(tidepool_free(ordinary));
  REQUIRE_TP(tidepool_symmetric_pool_trim(0, pool));
  const std::string trimmed = StatsOf(0, pool);
  std::printf("after trim: %s\n", trimmed.c_str());
  CHECK(StatField(trimmed, "segments") == 0);
  CHECK(StatField(trimmed, "device_frees") == StatField(trimmed, "device_allocations"));
  REQUIRE_TP(tidepool_symmetric_pool_destroy(0, pool));
  CHECK(tidepool_symmetric_begin(0, pool) == TIDEPOOL_NOT_FOUND);
  CHECK(tidepool_begin_allocate_current_thread_to_pool(0, pool) == TIDEPOOL_FAILED_PRECONDITION);

  const size_t free_after = RequireFreeBytes(*device);
  std::printf("free bytes: before the communicator %zu, with it %zu, after trim and destroy %zu\n",
              free_before, free_with_comm, free_after);
  // Every segment is back (NCCL keeps some resources for windows with the communicator).
  CHECK(free_after + 64 * kMiB >= free_with_comm);
  REQUIRE(one.nccl->Check(one.destroy(one.comm), "ncclCommDestroy").ok());
  REQUIRE(device->DestroyStream(stream).ok());
}

TEST_CASE("sglang's order inside a real capture: symmetric begin / end pause the graph's routing") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  REQUIRE(device->MakeCurrent().ok());
  Stream stream = RequireStream(*device);
  const OneRank one = RequireOneRankCommunicator();
  tidepool_pool_id pool{};
  REQUIRE_TP(tidepool_symmetric_pool_create(0, one.comm, 64 * kMiB, 30.0, &pool));
  REQUIRE_TP(tidepool_symmetric_pool_reserve(0, pool, 64 * kMiB));  // before capturing

  tidepool_capture* capture = nullptr;
  REQUIRE_TP(tidepool_capture_begin(0, stream, nullptr, TIDEPOOL_CAPTURE_MODE_GLOBAL, &capture));
  tidepool_pool_id graph_pool{};
  REQUIRE_TP(tidepool_capture_pool(capture, &graph_pool));
  void* before = nullptr;
  REQUIRE_TP(tidepool_malloc(&before, 64 * kKiB, 0, stream));
  CHECK(SamePool(PoolOf(before), graph_pool));

  REQUIRE_TP(tidepool_symmetric_begin(0, pool));
  void* send = nullptr;
  void* receive = nullptr;
  REQUIRE_TP(tidepool_malloc(&send, 8 * kMiB, 0, stream));
  REQUIRE_TP(tidepool_malloc(&receive, 8 * kMiB, 0, stream));
  CHECK(SamePool(PoolOf(send), pool));
  CHECK(SamePool(PoolOf(receive), pool));
  // A growth would register a window during the capture: refused before NCCL is called.
  void* too_big = nullptr;
  CHECK(tidepool_malloc(&too_big, 128 * kMiB, 0, stream) == TIDEPOOL_FAILED_PRECONDITION);
  CHECK(too_big == nullptr);
  AllReduce(one, send, receive, 8 * kMiB, stream);  // captured into the graph
  REQUIRE_TP(tidepool_symmetric_end(0, pool));
  CHECK(tidepool_symmetric_end(0, pool) == TIDEPOOL_FAILED_PRECONDITION);  // no begin left

  void* after = nullptr;
  REQUIRE_TP(tidepool_malloc(&after, 64 * kKiB, 0, stream));
  CHECK(SamePool(PoolOf(after), graph_pool));
  tidepool_graph* graph = nullptr;
  REQUIRE_TP(tidepool_capture_end(capture, &graph));

  FillPattern(*device, reinterpret_cast<uintptr_t>(send), 8 * kMiB, 0x5a5a0001u, stream);
  FillPattern(*device, reinterpret_cast<uintptr_t>(receive), 8 * kMiB, 0, stream);
  REQUIRE_TP(tidepool_graph_launch(graph, stream));
  const size_t wrong =
      CountMismatches(*device, reinterpret_cast<uintptr_t>(receive), 8 * kMiB, 0x5a5a0001u, stream);
  std::printf("captured all-reduce on symmetric buffers, replayed: %zu wrong bytes\n", wrong);
  CHECK(wrong == 0);

  REQUIRE_TP(tidepool_free(before));
  REQUIRE_TP(tidepool_free(after));
  REQUIRE_TP(tidepool_graph_destroy(graph));
  REQUIRE(device->SynchronizeStream(stream).ok());
  REQUIRE_TP(tidepool_free(send));
  REQUIRE_TP(tidepool_free(receive));
  REQUIRE_TP(tidepool_symmetric_pool_destroy(0, pool));
  REQUIRE(one.nccl->Check(one.destroy(one.comm), "ncclCommDestroy").ok());
  REQUIRE(device->DestroyStream(stream).ok());
}

}  // namespace
}  // namespace tidepool
