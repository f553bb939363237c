// Stream-ordered reuse on a real GPU: the contract at the top of caching_allocator.h, with work
// that really runs late.
//
// A spin kernel keeps a stream busy for a known time, so the test can look at the allocator while
// that work is certainly still running: a block freed on its own stream is handed out again at
// once (stream order makes that safe, and nothing waits), while a block that RecordStream says is
// used on another stream is not handed out until that stream's work has completed, and is handed
// out again after it has. A growth that takes free memory back waits for its own stream's fence,
// never for another stream's work. A last test runs threads on their own streams at once,
// checking data.
#include <cuda.h>

#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "catch2/catch.hpp"
#include "tests/gpu/gpu_test_util.h"

namespace tidepool {
namespace gpu_test {
namespace {

// The spin must outlast everything the host does between launching it and looking at the event:
// a few allocator calls, one of which may grow the heap.
constexpr uint64_t kSpinNanoseconds = 500'000'000;

bool Overlap(uintptr_t a, size_t a_bytes, uintptr_t b, size_t b_bytes) {
  return a < b + b_bytes && b < a + a_bytes;
}

TEST_CASE("a block freed on its own stream is reused at once, without waiting for the stream") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  SpinKernel spin(*device);
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  Stream stream = RequireStream(*device);
  absl::StatusOr<Event> spun = device->CreateEvent();
  TIDEPOOL_REQUIRE_OK(spun);
  const size_t bytes = 8 * kMiB;

  absl::StatusOr<void*> first = allocator->Allocate(bytes, stream);
  TIDEPOOL_REQUIRE_OK(first);
  spin.Launch(reinterpret_cast<uintptr_t>(*first), kSpinNanoseconds, 1, stream);
  TIDEPOOL_REQUIRE_OK(device->RecordEvent(*spun, stream));
  TIDEPOOL_REQUIRE_OK(allocator->Free(*first));

  absl::StatusOr<void*> second = allocator->Allocate(bytes, stream);
  TIDEPOOL_REQUIRE_OK(second);
  absl::StatusOr<bool> spin_done = device->QueryEvent(*spun);
  TIDEPOOL_REQUIRE_OK(spin_done);
  INFO("the spin kernel had finished by the time the allocator answered (a very slow host, or an "
       "allocator that waited for the stream): the check below would prove nothing");
  REQUIRE_FALSE(*spin_done);
  CHECK(*second == *first);

  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
  TIDEPOOL_REQUIRE_OK(allocator->Free(*second));
  TIDEPOOL_REQUIRE_OK(device->DestroyEvent(*spun));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

TEST_CASE("a growth that takes free memory back waits for no other stream's work") {
  // U runs a long spin kernel that uses none of T's memory. T frees a 16 MiB run and then grows
  // by 64 MiB: the growth takes the free run back (it moves whole) once T's own fresh fence has
  // passed (T is idle). Before stream fences, that took a device synchronization, which waited
  // for U's kernel too.
  std::unique_ptr<CudaDevice> device = RequireDevice();
  SpinKernel spin(*device);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, /*expandable=*/true);
  Stream t = RequireStream(*device);
  Stream u = RequireStream(*device);
  absl::StatusOr<Event> spun = device->CreateEvent();
  TIDEPOOL_REQUIRE_OK(spun);

  absl::StatusOr<void*> target = allocator->Allocate(4096, u);
  TIDEPOOL_REQUIRE_OK(target);
  absl::StatusOr<void*> freed = allocator->Allocate(16 * kMiB, t);
  TIDEPOOL_REQUIRE_OK(freed);
  absl::StatusOr<void*> kept = allocator->Allocate(16 * kMiB, t);
  TIDEPOOL_REQUIRE_OK(kept);
  FillPattern(*device, reinterpret_cast<uintptr_t>(*kept), 16 * kMiB, 0xfe11ce00u, t);
  TIDEPOOL_REQUIRE_OK(allocator->Free(*freed));
  // T idle: the fence the growth records on it passes within its brief wait.
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(t));
  const AllocatorStats before = allocator->GetStats();

  spin.Launch(reinterpret_cast<uintptr_t>(*target), kSpinNanoseconds, 7, u);
  TIDEPOOL_REQUIRE_OK(device->RecordEvent(*spun, u));
  absl::StatusOr<void*> grown = allocator->Allocate(64 * kMiB, t);
  TIDEPOOL_REQUIRE_OK(grown);
  absl::StatusOr<bool> spin_done = device->QueryEvent(*spun);
  TIDEPOOL_REQUIRE_OK(spin_done);
  const AllocatorStats after = allocator->GetStats();
  INFO("device allocations " << before.device_allocations << " -> " << after.device_allocations
                             << ", reserved " << before.reserved_bytes.current << " -> "
                             << after.reserved_bytes.current);
  // The free run was taken back: 64 MiB took 48 MiB of new memory (three runs), not 64.
  CHECK(after.reserved_bytes.current - before.reserved_bytes.current ==
        static_cast<int64_t>(48 * kMiB));
  // And U's kernel is still running: nothing waited for it.
  CHECK_FALSE(*spin_done);

  FillPattern(*device, reinterpret_cast<uintptr_t>(*grown), 64 * kMiB, 0x9e0e0000u, t);
  CHECK(CountMismatches(*device, reinterpret_cast<uintptr_t>(*grown), 64 * kMiB, 0x9e0e0000u,
                        t) == 0);
  CHECK(CountMismatches(*device, reinterpret_cast<uintptr_t>(*kept), 16 * kMiB, 0xfe11ce00u,
                        t) == 0);
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(u));
  for (void* ptr : {*grown, *kept, *target}) TIDEPOOL_REQUIRE_OK(allocator->Free(ptr));
  TIDEPOOL_REQUIRE_OK(device->DestroyEvent(*spun));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(t));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(u));
}

TEST_CASE("a block used on another stream is reused only after that stream's work completes") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const CudaDriver& driver = device->driver();
  SpinKernel spin(*device);
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  Stream owner = RequireStream(*device);
  Stream user = RequireStream(*device);
  absl::StatusOr<Event> filled = device->CreateEvent();
  absl::StatusOr<Event> used = device->CreateEvent();
  TIDEPOOL_REQUIRE_OK(filled);
  TIDEPOOL_REQUIRE_OK(used);
  const size_t bytes = 8 * kMiB;

  // Allocated and filled on `owner`; then `user` waits for the fill and works on the block for a
  // long time.
  absl::StatusOr<void*> block = allocator->Allocate(bytes, owner);
  TIDEPOOL_REQUIRE_OK(block);
  const uintptr_t address = reinterpret_cast<uintptr_t>(*block);
  FillPattern(*device, address, bytes, 0, owner);
  TIDEPOOL_REQUIRE_OK(device->RecordEvent(*filled, owner));
  TIDEPOOL_REQUIRE_OK(driver.Check(
      driver.cuStreamWaitEvent(ToCuStream(user), static_cast<CUevent>(*filled), 0),
      "cuStreamWaitEvent"));
  spin.Launch(address, kSpinNanoseconds, 0xb0b, user);
  TIDEPOOL_REQUIRE_OK(device->RecordEvent(*used, user));
  TIDEPOOL_REQUIRE_OK(allocator->RecordStream(*block, user));
  TIDEPOOL_REQUIRE_OK(allocator->Free(*block));

  // While `user` still works on it, the block must not come back, whole or in part.
  absl::StatusOr<void*> meanwhile = allocator->Allocate(bytes, owner);
  TIDEPOOL_REQUIRE_OK(meanwhile);
  absl::StatusOr<bool> user_done = device->QueryEvent(*used);
  TIDEPOOL_REQUIRE_OK(user_done);
  INFO("the spin kernel had finished by the time the allocator answered (a very slow host, or an "
       "allocator that waited for the stream): the check below would prove nothing");
  REQUIRE_FALSE(*user_done);
  INFO("freed block at " << std::hex << address << ", new block at "
                         << reinterpret_cast<uintptr_t>(*meanwhile));
  CHECK_FALSE(Overlap(address, bytes, reinterpret_cast<uintptr_t>(*meanwhile), bytes));

  // Once `user` has finished, the block is reusable on `owner` again.
  TIDEPOOL_REQUIRE_OK(device->SynchronizeEvent(*used));
  CHECK(CountMismatches(*device, address, 4, 0xb0b, user) == 0);  // the user's work did run
  TIDEPOOL_REQUIRE_OK(allocator->Free(*meanwhile));
  absl::StatusOr<void*> again = allocator->Allocate(bytes, owner);
  absl::StatusOr<void*> again_too = allocator->Allocate(bytes, owner);
  TIDEPOOL_REQUIRE_OK(again);
  TIDEPOOL_REQUIRE_OK(again_too);
  INFO("after the user finished: " << std::hex << reinterpret_cast<uintptr_t>(*again) << " and "
                                   << reinterpret_cast<uintptr_t>(*again_too));
  CHECK((*again == *block || *again_too == *block));

  TIDEPOOL_REQUIRE_OK(allocator->Free(*again));
  TIDEPOOL_REQUIRE_OK(allocator->Free(*again_too));
  TIDEPOOL_REQUIRE_OK(device->DestroyEvent(*filled));
  TIDEPOOL_REQUIRE_OK(device->DestroyEvent(*used));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(owner));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(user));
}

// One thread's loop for the test below. Catch2's assertions are not thread safe, so failures are
// collected as text and checked by the main thread.
void AllocateAndCheckOnOwnStream(CachingAllocator& allocator, CudaDevice& device, int thread,
                                 std::vector<std::string>* failures) {
  const CudaDriver& driver = device.driver();
  absl::StatusOr<Stream> stream = device.CreateStream();
  if (!stream.ok()) {
    failures->push_back(stream.status().ToString());
    return;
  }
  const CUstream cu_stream = ToCuStream(*stream);
  std::vector<uint32_t> host;
  constexpr int kIterations = 64;
  for (int i = 0; i < kIterations && failures->empty(); ++i) {
    // Sizes from 4 KiB to about 4 MiB, different in every thread and iteration.
    const size_t bytes = 4 * kKiB * (1 + (static_cast<size_t>(thread) * 131 + i * 37) % 1024);
    const uint32_t pattern = 0x70000000u | (static_cast<uint32_t>(thread) << 16) | i;
    absl::StatusOr<void*> ptr = allocator.Allocate(bytes, *stream);
    if (!ptr.ok()) {
      failures->push_back(ptr.status().ToString());
      break;
    }
    const CUdeviceptr address = reinterpret_cast<uintptr_t>(*ptr);
    host.assign(bytes / 4, 0);
    absl::Status copied = driver.Check(
        driver.cuMemsetD32Async(address, pattern, bytes / 4, cu_stream), "cuMemsetD32Async");
    if (copied.ok()) {
      copied = driver.Check(driver.cuMemcpyDtoHAsync(host.data(), address, bytes, cu_stream),
                            "cuMemcpyDtoHAsync");
    }
    if (copied.ok()) copied = device.SynchronizeStream(*stream);
    if (!copied.ok()) {
      failures->push_back(copied.ToString());
      break;
    }
    for (size_t word = 0; word < host.size(); ++word) {
      if (host[word] != pattern) {
        failures->push_back(absl::StrFormat("thread %d iteration %d: word %d of %#x is %#x", thread,
                                            i, word, address, host[word]));
        break;
      }
    }
    if (absl::Status freed = allocator.Free(*ptr); !freed.ok()) {
      failures->push_back(freed.ToString());
    }
  }
  if (absl::Status destroyed = device.DestroyStream(*stream); !destroyed.ok()) {
    failures->push_back(destroyed.ToString());
  }
}

TEST_CASE("threads on their own streams allocate at once and keep their data") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);

  constexpr int kThreads = 8;
  std::vector<std::vector<std::string>> failures(kThreads);
  std::vector<std::thread> threads;
  for (int t = 0; t < kThreads; ++t) {
    threads.emplace_back(AllocateAndCheckOnOwnStream, std::ref(*allocator), std::ref(*device), t,
                         &failures[t]);
  }
  for (std::thread& thread : threads) thread.join();
  for (int t = 0; t < kThreads; ++t) {
    INFO("thread " << t);
    for (const std::string& failure : failures[t]) FAIL_CHECK(failure);
  }
  CHECK(allocator->GetStats().active_blocks.current == 0);
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
