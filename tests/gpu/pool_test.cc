// Pools on a real GPU, through the runtime (runtime/runtime.h): sglang's pattern, and the runtime
// made from the driver's devices.
//
// sglang's pattern: a PoolScope routes the calling thread to a pool (begin), the thread allocates
// several buffers there, the scope ends the route and releases the pool, and the buffers stay in
// use afterwards. Meanwhile another thread allocates and frees in the default pool on its own
// stream. The device writes a pattern into every buffer (cuMemsetD32Async) and the host reads it
// back, before and after the scope ends, so routing never hands out memory that something else
// holds. Once the buffers are freed the pool is gone and its memory is back: its reserved bytes
// are 0, and the driver's free memory is back near where it started.
#include <cuda.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "allocator/cuda_driver.h"
#include "allocator/stats.h"
#include "catch2/catch.hpp"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "runtime/cuda_runtime.h"
#include "runtime/runtime.h"
#include "tests/gpu/gpu_test_util.h"

namespace tidepool {
namespace gpu_test {
namespace {

// What the driver's free memory may differ by between start and end for reasons that are not
// tidepool's (the driver's own bookkeeping); far below what the pool holds.
constexpr size_t kFreeMemorySlack = 32 * kMiB;

struct Buffer {
  void* ptr = nullptr;
  size_t bytes = 0;
  uint32_t pattern = 0;
};

// What the default-pool thread did. It never calls Catch2 (not thread safe); the test thread
// checks this after joining it.
struct WorkerReport {
  absl::Status first_error;
  int rounds = 0;
  int wrong_pool = 0;
  size_t mismatched_bytes = 0;
};

// Fills [ptr, ptr + bytes) (bytes a multiple of 4) with `pattern` on `stream`, reads it back and
// counts the bytes that differ: the worker's own FillPattern / CountMismatches, which report by
// status rather than by Catch2.
absl::StatusOr<size_t> FillAndCount(CudaDevice& device, void* ptr, size_t bytes, uint32_t pattern,
                                    Stream stream) {
  const CudaDriver& driver = device.driver();
  const CUdeviceptr address = reinterpret_cast<CUdeviceptr>(ptr);
  CUstream cu_stream = static_cast<CUstream>(stream);
  if (absl::Status s = driver.Check(driver.cuMemsetD32Async(address, pattern, bytes / 4, cu_stream),
                                    "cuMemsetD32Async");
      !s.ok()) {
    return s;
  }
  std::vector<uint32_t> host(bytes / 4);
  if (absl::Status s = driver.Check(
          driver.cuMemcpyDtoHAsync(host.data(), address, bytes, cu_stream), "cuMemcpyDtoHAsync");
      !s.ok()) {
    return s;
  }
  if (absl::Status s = device.SynchronizeStream(stream); !s.ok()) return s;
  size_t mismatched = 0;
  for (uint32_t word : host) {
    if (word != pattern) mismatched += 4;
  }
  return mismatched;
}

// Allocates, fills, checks and frees in the default pool until told to stop (and at least 20
// rounds), on its own stream.
WorkerReport AllocateInDefaultPool(CudaDevice& device, PoolManager& pools, Stream stream,
                                   const std::atomic<bool>& stop) {
  WorkerReport report;
  auto note = [&report](const absl::Status& status) {
    if (report.first_error.ok()) report.first_error = status;
  };
  if (absl::Status s = device.MakeCurrent(); !s.ok()) {
    note(s);
    return report;
  }
  while (!stop.load() || report.rounds < 20) {
    for (size_t bytes : {4 * size_t{1024}, 3 * kMiB, 24 * kMiB}) {
      absl::StatusOr<void*> block = pools.Allocate(bytes, stream);
      if (!block.ok()) {
        note(block.status());
        continue;
      }
      absl::StatusOr<PoolId> pool = pools.PoolOf(*block);
      if (!pool.ok() || !pool->is_default()) ++report.wrong_pool;
      absl::StatusOr<size_t> mismatched = FillAndCount(
          device, *block, bytes, 0x0dd00000u | static_cast<uint32_t>(report.rounds), stream);
      if (mismatched.ok()) {
        report.mismatched_bytes += *mismatched;
      } else {
        note(mismatched.status());
      }
      if (absl::Status s = pools.allocator()->Free(*block); !s.ok()) note(s);
    }
    ++report.rounds;
  }
  return report;
}

TEST_CASE(
    "sglang's pattern on the GPU: a scope's buffers go to its pool, hold their data while "
    "another thread uses the default pool, and the pool's memory comes back") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  Config config;
  config.expandable_segments = GENERATE(false, true);
  INFO("expandable_segments=" << config.expandable_segments);
  absl::StatusOr<std::unique_ptr<Runtime>> runtime = Runtime::Create({device.get()}, config);
  TIDEPOOL_REQUIRE_OK(runtime);
  absl::StatusOr<PoolManager*> found_pools = (*runtime)->Pools(0);
  TIDEPOOL_REQUIRE_OK(found_pools);
  PoolManager& pools = **found_pools;
  Stream stream = RequireStream(*device);
  Stream worker_stream = RequireStream(*device);
  const size_t free_at_start = RequireFreeBytes(*device);
  const PoolId pool = NewUserPoolId();

  std::atomic<bool> stop{false};
  WorkerReport report;
  std::thread worker([&] { report = AllocateInDefaultPool(*device, pools, worker_stream, stop); });

  std::vector<Buffer> buffers;
  size_t pool_bytes = 0;
  {
    PoolScope scope(&pools, pool);
    TIDEPOOL_REQUIRE_OK(scope.status());
    const size_t sizes[] = {512, 4 * kMiB + 4, 20 * kMiB, 100 * kMiB + 8, 128 * kMiB};
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); ++i) {
      absl::StatusOr<void*> ptr = pools.Allocate(sizes[i], stream);
      TIDEPOOL_REQUIRE_OK(ptr);
      absl::StatusOr<PoolId> home = pools.PoolOf(*ptr);
      TIDEPOOL_REQUIRE_OK(home);
      CHECK(*home == pool);
      buffers.push_back(Buffer{*ptr, sizes[i], 0x5a000000u | static_cast<uint32_t>(i)});
      pool_bytes += sizes[i];
    }
    for (const Buffer& buffer : buffers) {
      FillPattern(*device, reinterpret_cast<uintptr_t>(buffer.ptr), buffer.bytes, buffer.pattern,
                  stream);
    }
    for (const Buffer& buffer : buffers) {
      INFO("buffer of " << buffer.bytes << " bytes, inside the scope");
      CHECK(CountMismatches(*device, reinterpret_cast<uintptr_t>(buffer.ptr), buffer.bytes,
                            buffer.pattern, stream) == 0);
    }
    CHECK(RequireFreeBytes(*device) + pool_bytes <= free_at_start + kFreeMemorySlack);
  }

  // The scope ended the route and released the pool; its buffers are still live and intact.
  absl::StatusOr<PoolInfo> info = pools.Info(pool);
  TIDEPOOL_REQUIRE_OK(info);
  CHECK(info->released);
  CHECK(info->routes == 0);
  CHECK(info->live_blocks == static_cast<int64_t>(buffers.size()));
  absl::StatusOr<PoolId> route = pools.RouteOf(stream);
  TIDEPOOL_REQUIRE_OK(route);
  CHECK(route->is_default());
  for (const Buffer& buffer : buffers) {
    INFO("buffer of " << buffer.bytes << " bytes, after the scope");
    CHECK(CountMismatches(*device, reinterpret_cast<uintptr_t>(buffer.ptr), buffer.bytes,
                          buffer.pattern, stream) == 0);
  }

  stop = true;
  worker.join();
  INFO("worker: " << report.rounds << " rounds, first error: " << report.first_error.ToString());
  CHECK(report.first_error.ok());
  CHECK(report.wrong_pool == 0);
  CHECK(report.mismatched_bytes == 0);
  CHECK(report.rounds >= 20);

  // Freeing the last buffer makes the pool gone: its memory goes back to the device.
  for (const Buffer& buffer : buffers) TIDEPOOL_REQUIRE_OK((*runtime)->Free(buffer.ptr));
  absl::StatusOr<AllocatorStats> pool_stats = pools.Stats(pool);
  TIDEPOOL_REQUIRE_OK(pool_stats);
  CHECK(pool_stats->reserved_bytes.current == 0);
  CHECK(pool_stats->active_blocks.current == 0);
  TIDEPOOL_REQUIRE_OK(pools.allocator()->EmptyCache());
  CHECK(pools.allocator()->GetStats().reserved_bytes.current == 0);
  const size_t free_at_end = RequireFreeBytes(*device);
  INFO("free bytes at start " << free_at_start << ", at end " << free_at_end);
  CHECK(free_at_end + kFreeMemorySlack >= free_at_start);

  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(worker_stream));
}

TEST_CASE("a runtime made from the driver's devices serves each of them") {
  absl::StatusOr<std::unique_ptr<Runtime>> runtime = CreateCudaRuntime(Config{});
  INFO("These tests need an NVIDIA GPU and its driver.");
  TIDEPOOL_REQUIRE_OK(runtime);
  REQUIRE((*runtime)->device_count() >= 1);
  for (int device = 0; device < (*runtime)->device_count(); ++device) {
    INFO("device " << device);
    absl::StatusOr<PoolManager*> pools = (*runtime)->Pools(device);
    TIDEPOOL_REQUIRE_OK(pools);
    absl::StatusOr<void*> block = (*pools)->Allocate(kMiB, nullptr);
    TIDEPOOL_REQUIRE_OK(block);
    absl::StatusOr<BlockHome> home = (*runtime)->HomeOf(*block);
    TIDEPOOL_REQUIRE_OK(home);
    CHECK(home->device == device);
    CHECK(home->pool.is_default());
    TIDEPOOL_REQUIRE_OK((*runtime)->Free(*block));
    CHECK(absl::IsFailedPrecondition((*runtime)->Free(*block)));
  }
  CHECK(absl::IsNotFound((*runtime)->Pools((*runtime)->device_count()).status()));
  int foreign = 0;
  CHECK(absl::IsInvalidArgument((*runtime)->Free(&foreign)));
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
