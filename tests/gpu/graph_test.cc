// CUDA graph capture with tidepool on a real GPU (graph/capture.h): what a capture allocates goes
// to its private (or shared) pool, the graph replays correctly into that memory for as long as it
// lives, nothing else is ever handed that memory, and a capture that fails or is abandoned leaves
// nothing behind.
//
// Every graph here does real device work on the memory it allocates (cuMemsetD32Async and
// cuMemcpyDtoDAsync, which are captured as graph nodes), and the tests check the results on the
// host after each replay, with the output poisoned before the replay, so a graph that did not run
// or ran into the wrong memory fails. The cases:
//   * one capture forking a second stream (event join): the temporaries of both streams go to the
//     capture's pool, a block freed after use on the other stream is not handed out again during
//     the capture, and 100 replays with a different input each time give the right output; the
//     pool keeps its memory through EmptyCache while the graph lives, and gives it back when the
//     graph is destroyed;
//   * two graphs sharing one pool (SharedPool): the second reuses the first's free memory, they
//     replay alternately on one stream, and the pool's references follow the graphs and the
//     handle;
//   * canaries in the default pool, allocated right before and right after the capture (so they
//     may be address neighbours of the graph's memory), stay intact through many replays;
//   * another thread allocating, filling and freeing in the default pool while a capture runs does
//     not invalidate the capture and never gets the capture's memory;
//   * a capture the driver invalidates, and one abandoned, release their pool and route: the
//     blocks they allocated free normally, the pool's memory goes back, and the driver's free
//     memory returns to where it was;
//   * a pool scope entered inside a capture (sglang's symmetric buffer) takes that thread's
//     allocations to its pool and gives the capture's routing back after, with balanced
//     references, and the graph writes the scope's buffer on every replay;
//   * sglang's own order, which pauses a capture without a scope (ends the capture's route by hand,
//     routes to its pool and back, resumes with a begin): the capture still ends with a graph
//     that replays correctly, and references balance;
//   * a side stream destroyed during a capture after a deferred free's use on it is never touched
//     again (the deferred free waits for the device instead);
//   * a capture that must take new device memory (a 256 MiB block and more) still ends and
//     replays correctly.
// Each case runs with expandable segments on and off.
#include <cuda.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "allocator/caching_allocator.h"
#include "allocator/config.h"
#include "allocator/cuda_device.h"
#include "allocator/cuda_driver.h"
#include "allocator/device.h"
#include "allocator/stats.h"
#include "catch2/catch.hpp"
#include "graph/capture.h"
#include "pool/pool_id.h"
#include "pool/pool_manager.h"
#include "pool/route.h"
#include "tests/gpu/gpu_test_util.h"

namespace tidepool {
namespace gpu_test {
namespace {

using graph::Capture;
using graph::CaptureOptions;
using graph::Graph;
using graph::SharedPool;

// What the driver's free memory may differ by before a capture and after its cleanup for reasons
// that are not tidepool's: the driver keeps some memory of its own for graphs, streams and events,
// and takes or returns it in pages of a few MiB. The captures below hold tens of MiB, so a leak
// of their memory is far above this.
constexpr size_t kFreeMemorySlack = 4 * kMiB;

// What replays write over their outputs before running, so that a replay that did not write them
// fails.
constexpr uint32_t kPoison = 0xdeadbeefu;

uintptr_t Address(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr); }

bool Overlap(const void* a, size_t a_bytes, const void* b, size_t b_bytes) {
  return Address(a) < Address(b) + b_bytes && Address(b) < Address(a) + a_bytes;
}

void RequireDriver(const CudaDevice& device, CUresult result, const char* what) {
  TIDEPOOL_REQUIRE_OK(device.driver().Check(result, what));
}

// Queues a copy of `bytes` from `src` to `dst` on `stream` (captured as a memcpy node).
void CopyAsync(CudaDevice& device, void* dst, const void* src, size_t bytes, Stream stream) {
  RequireDriver(device,
                device.driver().cuMemcpyDtoDAsync(Address(dst), Address(src), bytes,
                                                  ToCuStream(stream)),
                "cuMemcpyDtoDAsync");
}

// Makes `to` wait for the work queued on `from` so far: an event recorded on `from`, waited on by
// `to`. During a capture this is how a second stream joins the capture (it takes the capture's id
// and its work becomes part of the graph), and how it joins back before the capture ends. The
// event may be destroyed once the wait is queued: the wait keeps what it needs (during a capture
// it is already an edge of the graph).
void Join(CudaDevice& device, Stream from, Stream to) {
  absl::StatusOr<Event> event = device.CreateEvent();
  TIDEPOOL_REQUIRE_OK(event);
  TIDEPOOL_REQUIRE_OK(device.RecordEvent(*event, from));
  RequireDriver(device,
                device.driver().cuStreamWaitEvent(ToCuStream(to), static_cast<CUevent>(*event), 0),
                "cuStreamWaitEvent");
  TIDEPOOL_REQUIRE_OK(device.DestroyEvent(*event));
}

// Writes `words` to `dst` and waits until they are there. cuMemcpyHtoD from pageable memory may
// return before its DMA has finished, and the non-blocking streams that read `dst` next do not
// wait for it, so the context is synchronized.
void Upload(CudaDevice& device, void* dst, const std::vector<uint32_t>& words) {
  RequireDriver(device,
                device.driver().cuMemcpyHtoD(Address(dst), words.data(),
                                             words.size() * sizeof(uint32_t)),
                "cuMemcpyHtoD");
  TIDEPOOL_REQUIRE_OK(device.SynchronizeDevice());
}

// The `words` 32-bit words at `src`, read after the work queued on `stream`.
std::vector<uint32_t> Download(CudaDevice& device, const void* src, size_t words, Stream stream) {
  std::vector<uint32_t> host(words);
  RequireDriver(device,
                device.driver().cuMemcpyDtoHAsync(host.data(), Address(src),
                                                  words * sizeof(uint32_t), ToCuStream(stream)),
                "cuMemcpyDtoHAsync");
  TIDEPOOL_REQUIRE_OK(device.SynchronizeStream(stream));
  return host;
}

// How many words differ, and the first that does.
struct Difference {
  size_t words = 0;
  size_t first = 0;
  uint32_t got = 0;
  uint32_t want = 0;
};

Difference Compare(const std::vector<uint32_t>& got, const std::vector<uint32_t>& want) {
  REQUIRE(got.size() == want.size());
  Difference difference;
  for (size_t i = 0; i < got.size(); ++i) {
    if (got[i] == want[i]) continue;
    if (difference.words == 0) {
      difference.first = i;
      difference.got = got[i];
      difference.want = want[i];
    }
    ++difference.words;
  }
  return difference;
}

// Different in every word and every round, so that a copy from the wrong offset or a stale
// output is caught.
uint32_t InputWord(size_t index, int round) {
  return static_cast<uint32_t>(index * 2654435761u) ^ (static_cast<uint32_t>(round) * 0x9e3779b9u);
}

std::vector<uint32_t> InputWords(size_t words, int round) {
  std::vector<uint32_t> host(words);
  for (size_t i = 0; i < words; ++i) host[i] = InputWord(i, round);
  return host;
}

// The REQUIREd forms of the pool manager's and the capture's calls.
void* RequireAllocate(PoolManager& pools, size_t bytes, Stream stream) {
  absl::StatusOr<void*> ptr = pools.Allocate(bytes, stream);
  TIDEPOOL_REQUIRE_OK(ptr);
  return *ptr;
}

PoolId RequirePoolOf(PoolManager& pools, const void* ptr) {
  absl::StatusOr<PoolId> pool = pools.PoolOf(ptr);
  TIDEPOOL_REQUIRE_OK(pool);
  return *pool;
}

PoolId RequireRouteOf(PoolManager& pools, Stream stream) {
  absl::StatusOr<PoolId> pool = pools.RouteOf(stream);
  TIDEPOOL_REQUIRE_OK(pool);
  return *pool;
}

PoolInfo RequireInfo(PoolManager& pools, PoolId pool) {
  absl::StatusOr<PoolInfo> info = pools.Info(pool);
  TIDEPOOL_REQUIRE_OK(info);
  return *info;
}

int64_t ReservedIn(PoolManager& pools, PoolId pool) {
  absl::StatusOr<AllocatorStats> stats = pools.Stats(pool);
  TIDEPOOL_REQUIRE_OK(stats);
  return stats->reserved_bytes.current;
}

Capture RequireBegin(CudaDevice& device, PoolManager& pools, Stream stream,
                     const CaptureOptions& options = {}) {
  absl::StatusOr<Capture> capture = Capture::Begin(&device, &pools, stream, options);
  TIDEPOOL_REQUIRE_OK(capture);
  return *std::move(capture);
}

Graph RequireEnd(Capture& capture) {
  absl::StatusOr<Graph> graph = capture.End();
  TIDEPOOL_REQUIRE_OK(graph);
  return *std::move(graph);
}

bool IsCapturing(CudaDevice& device, Stream stream) {
  absl::StatusOr<CaptureInfo> info = device.GetCaptureInfo(stream);
  TIDEPOOL_REQUIRE_OK(info);
  return info->capturing;
}

// A buffer filled with a pattern that nothing should ever change.
struct Canary {
  void* ptr = nullptr;
  size_t bytes = 0;
  uint32_t pattern = 0;
};

TEST_CASE(
    "a capture with a forked stream: its temporaries go to its pool, and 100 replays give the "
    "right output",
    "[gpu]") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream s1 = RequireStream(*device);
  Stream s2 = RequireStream(*device);

  // The graph computes out = in, with the last quarter replaced by kTail.
  constexpr size_t kWords = size_t{1} << 20;
  constexpr size_t kBytes = kWords * sizeof(uint32_t);
  constexpr size_t kTailWord = kWords * 3 / 4;
  constexpr uint32_t kTail = 0x7a11ed00u;
  void* in = RequireAllocate(pools, kBytes, s1);
  void* out = RequireAllocate(pools, kBytes, s1);
  CHECK(RequirePoolOf(pools, in) == kDefaultPool);
  CHECK(RequirePoolOf(pools, out) == kDefaultPool);
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(s1));

  PoolId pool;
  Graph graph;
  {
    Capture capture = RequireBegin(*device, pools, s1);
    pool = capture.pool();
    CHECK(pool.first != 0);  // a graph pool id, {n, 0}
    CHECK(pool.second == 0);
    CHECK(allocator->captures_underway() == 1);
    CHECK(RequireRouteOf(pools, s1) == pool);
    CHECK(RequireRouteOf(pools, s2) == kDefaultPool);  // not part of the capture yet

    void* tmp1 = RequireAllocate(pools, kBytes, s1);
    CHECK(RequirePoolOf(pools, tmp1) == pool);
    CopyAsync(*device, tmp1, in, kBytes, s1);

    Join(*device, s1, s2);  // s2 joins the capture
    CHECK(RequireRouteOf(pools, s2) == pool);
    void* tmp2 = RequireAllocate(pools, kBytes, s2);
    CHECK(RequirePoolOf(pools, tmp2) == pool);
    CHECK_FALSE(Overlap(tmp1, kBytes, tmp2, kBytes));
    CopyAsync(*device, tmp2, tmp1, kBytes, s2);
    FillPattern(*device, Address(tmp2) + kTailWord * 4, kBytes - kTailWord * 4, kTail, s2);

    // tmp1 was read on s2: its free is deferred until the capture ends, so s1 must not get it
    // back now. If it did, the fill below would run in the graph at the same time as s2's read
    // of tmp1 and spoil the output.
    TIDEPOOL_REQUIRE_OK(allocator->RecordStream(tmp1, s2));
    TIDEPOOL_REQUIRE_OK(allocator->Free(tmp1));
    void* tmp3 = RequireAllocate(pools, kBytes, s1);
    CHECK(RequirePoolOf(pools, tmp3) == pool);
    INFO("tmp1 " << tmp1 << ", tmp3 " << tmp3);
    CHECK_FALSE(Overlap(tmp1, kBytes, tmp3, kBytes));
    FillPattern(*device, Address(tmp3), kBytes, 0xbadbad00u, s1);
    TIDEPOOL_REQUIRE_OK(allocator->Free(tmp3));

    CopyAsync(*device, out, tmp2, kBytes, s2);
    TIDEPOOL_REQUIRE_OK(allocator->Free(tmp2));  // used on its own stream only: reusable at once
    Join(*device, s2, s1);                        // s2 joins back before the capture ends

    const PoolInfo during = RequireInfo(pools, pool);
    CHECK(during.references == 1);
    CHECK(during.routes == 1);
    CHECK_FALSE(during.released);
    graph = RequireEnd(capture);
    CHECK(graph.valid());
    CHECK(graph.pool() == capture.pool());
    CHECK_FALSE(capture.active());
  }
  CHECK(allocator->captures_underway() == 0);
  CHECK(RequireRouteOf(pools, s1) == kDefaultPool);
  CHECK(RequireRouteOf(pools, s2) == kDefaultPool);
  const PoolInfo held = RequireInfo(pools, pool);
  CHECK(held.references == 1);  // the graph's
  CHECK(held.routes == 0);
  CHECK(held.live_blocks == 0);  // every temporary was freed during the capture
  CHECK_FALSE(held.released);
  // tmp1, tmp2 and tmp3 were live at once: the pool holds at least their memory, for the graph.
  const int64_t reserved = ReservedIn(pools, pool);
  CHECK(reserved >= static_cast<int64_t>(3 * kBytes));

  std::vector<uint32_t> want(kWords);
  for (int round = 0; round < 100; ++round) {
    INFO("replay " << round);
    if (round == 50) {
      // The graph's memory stays where it is while the graph lives: EmptyCache leaves the pool
      // alone and trimming it is refused.
      TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(s1));
      TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
      CHECK(absl::IsFailedPrecondition(pools.Trim(pool)));
      CHECK(ReservedIn(pools, pool) == reserved);
    }
    const std::vector<uint32_t> input = InputWords(kWords, round);
    for (size_t i = 0; i < kWords; ++i) want[i] = i < kTailWord ? input[i] : kTail;
    Upload(*device, in, input);
    FillPattern(*device, Address(out), kBytes, kPoison, s1);
    TIDEPOOL_REQUIRE_OK(graph.Launch(s1));
    const Difference difference = Compare(Download(*device, out, kWords, s1), want);
    INFO(difference.words << " words differ; the first, word " << difference.first << ", is "
                          << std::hex << difference.got << " for " << difference.want);
    REQUIRE(difference.words == 0);
  }

  // Destroying the graph releases the pool, and its memory goes back.
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(s1));
  TIDEPOOL_REQUIRE_OK(graph.Reset());
  CHECK_FALSE(graph.valid());
  TIDEPOOL_REQUIRE_OK(graph.Reset());  // a second Reset does nothing
  const PoolInfo after = RequireInfo(pools, pool);
  CHECK(after.released);
  CHECK(after.references == 0);
  CHECK(after.live_blocks == 0);
  CHECK(ReservedIn(pools, pool) == 0);
  CHECK(absl::IsFailedPrecondition(graph.Launch(s1)));

  TIDEPOOL_REQUIRE_OK(allocator->Free(in));
  TIDEPOOL_REQUIRE_OK(allocator->Free(out));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  CHECK(allocator->GetStats().reserved_bytes.current == 0);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(s1));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(s2));
}

TEST_CASE("two graphs share one pool and replay alternately on one stream", "[gpu]") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream stream = RequireStream(*device);

  // Graph A computes out_a = in with the first quarter replaced by kA; graph B computes
  // out_b = in with the second quarter replaced by kB. Each goes through a temporary of the
  // shared pool.
  constexpr size_t kWords = size_t{1} << 18;
  constexpr size_t kBytes = kWords * sizeof(uint32_t);
  constexpr size_t kQuarter = kWords / 4;
  constexpr uint32_t kA = 0xaaaa0000u;
  constexpr uint32_t kB = 0xbbbb0000u;
  void* in = RequireAllocate(pools, kBytes, stream);
  void* out_a = RequireAllocate(pools, kBytes, stream);
  void* out_b = RequireAllocate(pools, kBytes, stream);

  absl::StatusOr<SharedPool> created = SharedPool::Create(&pools);
  TIDEPOOL_REQUIRE_OK(created);
  SharedPool shared = *std::move(created);
  const PoolId pool = shared.id();
  CHECK(pool.first != 0);
  CHECK(RequireInfo(pools, pool).references == 1);
  CaptureOptions options;
  options.pool = pool;

  // Captures a graph that copies `in` through a temporary of the shared pool into `out`, with
  // the quarter `quarter` replaced by `pattern`; `references` is the pool's count during it.
  auto capture_graph = [&](size_t quarter, uint32_t pattern, void* out, int64_t references,
                           void** tmp) {
    Capture capture = RequireBegin(*device, pools, stream, options);
    CHECK(capture.pool() == pool);
    CHECK(RequireInfo(pools, pool).references == references);
    *tmp = RequireAllocate(pools, kBytes, stream);
    CHECK(RequirePoolOf(pools, *tmp) == pool);
    CopyAsync(*device, *tmp, in, kBytes, stream);
    FillPattern(*device, Address(*tmp) + quarter * kQuarter * 4, kQuarter * 4, pattern, stream);
    CopyAsync(*device, out, *tmp, kBytes, stream);
    TIDEPOOL_REQUIRE_OK(allocator->Free(*tmp));
    return RequireEnd(capture);
  };
  void* tmp_a = nullptr;
  Graph a = capture_graph(/*quarter=*/0, kA, out_a, /*references=*/2, &tmp_a);
  CHECK(a.pool() == pool);
  CHECK(RequireInfo(pools, pool).references == 2);
  const int64_t reserved_after_a = ReservedIn(pools, pool);
  CHECK(reserved_after_a >= static_cast<int64_t>(kBytes));

  void* tmp_b = nullptr;
  Graph b = capture_graph(/*quarter=*/1, kB, out_b, /*references=*/3, &tmp_b);
  CHECK(b.pool() == pool);
  CHECK(RequireInfo(pools, pool).references == 3);
  // B's temporary came from A's free memory: the pool is shared, and it did not grow.
  INFO("A's temporary at " << tmp_a << ", B's at " << tmp_b);
  CHECK(ReservedIn(pools, pool) == reserved_after_a);

  std::vector<uint32_t> want_a(kWords);
  std::vector<uint32_t> want_b(kWords);
  for (int round = 0; round < 100; ++round) {
    INFO("round " << round << (round % 2 == 0 ? ": A, then B" : ": B, then A"));
    const std::vector<uint32_t> input = InputWords(kWords, round);
    for (size_t i = 0; i < kWords; ++i) {
      want_a[i] = i < kQuarter ? kA : input[i];
      want_b[i] = i >= kQuarter && i < 2 * kQuarter ? kB : input[i];
    }
    Upload(*device, in, input);
    FillPattern(*device, Address(out_a), kBytes, kPoison, stream);
    FillPattern(*device, Address(out_b), kBytes, kPoison, stream);
    Graph& first = round % 2 == 0 ? a : b;
    Graph& second = round % 2 == 0 ? b : a;
    TIDEPOOL_REQUIRE_OK(first.Launch(stream));
    TIDEPOOL_REQUIRE_OK(second.Launch(stream));
    const Difference difference_a = Compare(Download(*device, out_a, kWords, stream), want_a);
    const Difference difference_b = Compare(Download(*device, out_b, kWords, stream), want_b);
    INFO("A: " << difference_a.words << " words differ, the first at " << difference_a.first
               << "; B: " << difference_b.words << " words differ, the first at "
               << difference_b.first);
    REQUIRE(difference_a.words == 0);
    REQUIRE(difference_b.words == 0);
  }

  // Each graph holds one reference and the handle one; the pool is released with the last.
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
  TIDEPOOL_REQUIRE_OK(a.Reset());
  CHECK(RequireInfo(pools, pool).references == 2);
  TIDEPOOL_REQUIRE_OK(b.Reset());
  CHECK(RequireInfo(pools, pool).references == 1);
  CHECK_FALSE(RequireInfo(pools, pool).released);
  CHECK(ReservedIn(pools, pool) == reserved_after_a);  // the handle keeps the memory too
  TIDEPOOL_REQUIRE_OK(shared.Reset());
  const PoolInfo after = RequireInfo(pools, pool);
  CHECK(after.references == 0);
  CHECK(after.released);
  CHECK(after.live_blocks == 0);
  CHECK(ReservedIn(pools, pool) == 0);
  // Nothing holds the pool any more, so no capture may share it.
  CHECK(absl::IsFailedPrecondition(Capture::Begin(device.get(), &pools, stream, options).status()));
  CHECK(allocator->captures_underway() == 0);
  CHECK_FALSE(IsCapturing(*device, stream));

  TIDEPOOL_REQUIRE_OK(allocator->Free(in));
  TIDEPOOL_REQUIRE_OK(allocator->Free(out_a));
  TIDEPOOL_REQUIRE_OK(allocator->Free(out_b));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  CHECK(allocator->GetStats().reserved_bytes.current == 0);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

// Allocates one canary of each size in the default pool on `stream` and fills it.
std::vector<Canary> AllocateCanaries(CudaDevice& device, PoolManager& pools, Stream stream,
                                     uint32_t pattern_base) {
  const size_t sizes[] = {512, 64 * kKiB + 512, 2 * kMiB, 5 * kMiB + 4 * kKiB, 24 * kMiB,
                          80 * kMiB};
  std::vector<Canary> canaries;
  for (size_t size : sizes) {
    Canary canary;
    canary.ptr = RequireAllocate(pools, size, stream);
    canary.bytes = size;
    canary.pattern = pattern_base | static_cast<uint32_t>(canaries.size());
    CHECK(RequirePoolOf(pools, canary.ptr) == kDefaultPool);
    FillPattern(device, Address(canary.ptr), canary.bytes, canary.pattern, stream);
    canaries.push_back(canary);
  }
  return canaries;
}

TEST_CASE("replays write only the graph's own memory: canaries around it stay intact", "[gpu]") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream stream = RequireStream(*device);

  std::vector<Canary> canaries = AllocateCanaries(*device, pools, stream, 0xc0000000u);

  // The graph fills every temporary it allocates, whole, with a pattern of its own, frees some,
  // allocates more (which may reuse what it freed), and copies the first 4 KiB of each temporary
  // into `result`, a block of its pool it keeps: the graph's output.
  constexpr size_t kChunk = 4 * kKiB;
  const size_t first_sizes[] = {4 * kKiB, kMiB + 512, 3 * kMiB, 24 * kMiB, 64 * kMiB + 4 * kKiB};
  const size_t second_sizes[] = {8 * kKiB, 512 * kKiB, 2 * kMiB};
  constexpr size_t kChunks = 8;
  std::vector<std::pair<void*, size_t>> graph_blocks;  // every block the graph ever allocated
  std::vector<uint32_t> chunk_patterns;
  void* result = nullptr;
  PoolId pool;
  Graph graph;
  {
    Capture capture = RequireBegin(*device, pools, stream);
    pool = capture.pool();
    result = RequireAllocate(pools, kChunks * kChunk, stream);
    graph_blocks.emplace_back(result, kChunks * kChunk);
    auto allocate_and_fill = [&](size_t bytes) {
      void* block = RequireAllocate(pools, bytes, stream);
      CHECK(RequirePoolOf(pools, block) == pool);
      const uint32_t pattern = 0x6a000000u | static_cast<uint32_t>(chunk_patterns.size());
      FillPattern(*device, Address(block), bytes, pattern, stream);
      CopyAsync(*device, static_cast<char*>(result) + chunk_patterns.size() * kChunk, block,
                kChunk, stream);
      chunk_patterns.push_back(pattern);
      graph_blocks.emplace_back(block, bytes);
      return block;
    };
    std::vector<void*> first;
    for (size_t bytes : first_sizes) first.push_back(allocate_and_fill(bytes));
    for (size_t i = 0; i < first.size(); i += 2) TIDEPOOL_REQUIRE_OK(allocator->Free(first[i]));
    std::vector<void*> second;
    for (size_t bytes : second_sizes) second.push_back(allocate_and_fill(bytes));
    for (size_t i = 1; i < first.size(); i += 2) TIDEPOOL_REQUIRE_OK(allocator->Free(first[i]));
    for (void* block : second) TIDEPOOL_REQUIRE_OK(allocator->Free(block));
    REQUIRE(chunk_patterns.size() == kChunks);
    graph = RequireEnd(capture);
  }
  CHECK(RequireInfo(pools, pool).live_blocks == 1);  // result

  std::vector<Canary> after = AllocateCanaries(*device, pools, stream, 0xa0000000u);
  canaries.insert(canaries.end(), after.begin(), after.end());
  for (const Canary& canary : canaries) {
    for (const auto& [block, bytes] : graph_blocks) {
      INFO("canary " << canary.ptr << " (" << canary.bytes << " bytes), graph block " << block
                     << " (" << bytes << " bytes)");
      CHECK_FALSE(Overlap(canary.ptr, canary.bytes, block, bytes));
    }
  }

  std::vector<uint32_t> want(kChunks * kChunk / 4);
  for (size_t i = 0; i < want.size(); ++i) want[i] = chunk_patterns[i / (kChunk / 4)];
  for (int round = 0; round < 4; ++round) {
    INFO("after " << (round + 1) * 16 << " replays");
    FillPattern(*device, Address(result), kChunks * kChunk, kPoison, stream);
    for (int replay = 0; replay < 16; ++replay) TIDEPOOL_REQUIRE_OK(graph.Launch(stream));
    const Difference difference = Compare(Download(*device, result, want.size(), stream), want);
    INFO("result: " << difference.words << " words differ, the first at " << difference.first);
    CHECK(difference.words == 0);
    for (const Canary& canary : canaries) {
      INFO("canary " << canary.ptr << " of " << canary.bytes << " bytes");
      CHECK(CountMismatches(*device, Address(canary.ptr), canary.bytes, canary.pattern, stream) ==
            0);
    }
  }

  // The graph's output outlives the graph: the released pool keeps it until it is freed, and is
  // gone after.
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
  TIDEPOOL_REQUIRE_OK(graph.Reset());
  PoolInfo info = RequireInfo(pools, pool);
  CHECK(info.released);
  CHECK(info.live_blocks == 1);
  CHECK(RequirePoolOf(pools, result) == pool);
  CHECK(Compare(Download(*device, result, want.size(), stream), want).words == 0);
  TIDEPOOL_REQUIRE_OK(allocator->Free(result));
  info = RequireInfo(pools, pool);
  CHECK(info.live_blocks == 0);
  CHECK(ReservedIn(pools, pool) == 0);
  for (const Canary& canary : canaries) {
    INFO("canary " << canary.ptr << " of " << canary.bytes << " bytes, after the graph");
    CHECK(CountMismatches(*device, Address(canary.ptr), canary.bytes, canary.pattern, stream) ==
          0);
    TIDEPOOL_REQUIRE_OK(allocator->Free(canary.ptr));
  }
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  CHECK(allocator->GetStats().reserved_bytes.current == 0);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

// What the default-pool thread of the next test did. It never calls Catch2 (not thread safe); the
// test thread checks this after joining it.
struct WorkerReport {
  absl::Status first_error;
  int rounds = 0;
  int wrong_pool = 0;
  size_t mismatched_words = 0;
};

// Allocates, fills, reads back, checks and frees `rounds` blocks through `pools` on its own
// (non-capturing) stream, once `go` is set; sets `done` when finished.
void AllocateInDefaultPool(CudaDevice* device, PoolManager* pools, Stream stream, int rounds,
                           const std::atomic<bool>* go, std::atomic<bool>* done,
                           WorkerReport* report) {
  auto note = [report](const absl::Status& status) {
    if (report->first_error.ok()) report->first_error = status;
  };
  while (!go->load()) std::this_thread::yield();
  if (absl::Status s = device->MakeCurrent(); !s.ok()) {
    note(s);
    done->store(true);
    return;
  }
  const CudaDriver& driver = device->driver();
  const CUstream cu_stream = ToCuStream(stream);
  const size_t sizes[] = {4 * kKiB, 256 * kKiB + 512, 3 * kMiB, 24 * kMiB};
  std::vector<uint32_t> host;
  for (int round = 0; round < rounds && report->first_error.ok(); ++round) {
    const size_t bytes = sizes[round % 4];
    const uint32_t pattern = 0x0dd00000u | static_cast<uint32_t>(round);
    absl::StatusOr<void*> block = pools->Allocate(bytes, stream);
    if (!block.ok()) {
      note(block.status());
      break;
    }
    absl::StatusOr<PoolId> pool = pools->PoolOf(*block);
    if (!pool.ok() || *pool != kDefaultPool) ++report->wrong_pool;
    host.assign(bytes / 4, 0);
    absl::Status s = driver.Check(
        driver.cuMemsetD32Async(Address(*block), pattern, bytes / 4, cu_stream),
        "cuMemsetD32Async");
    if (s.ok()) {
      s = driver.Check(driver.cuMemcpyDtoHAsync(host.data(), Address(*block), bytes, cu_stream),
                       "cuMemcpyDtoHAsync");
    }
    if (s.ok()) s = device->SynchronizeStream(stream);
    if (!s.ok()) note(s);
    for (uint32_t word : host) {
      if (word != pattern) ++report->mismatched_words;
    }
    if (absl::Status freed = pools->allocator()->Free(*block); !freed.ok()) note(freed);
    report->rounds = round + 1;
  }
  done->store(true);
}

TEST_CASE(
    "another thread allocates in the default pool while a capture runs, and the capture stays "
    "valid",
    "[gpu]") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  const CaptureMode mode = GENERATE(CaptureMode::kThreadLocal, CaptureMode::kRelaxed);
  INFO("expandable_segments=" << expandable << ", mode "
                              << (mode == CaptureMode::kThreadLocal ? "thread-local" : "relaxed"));
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream stream = RequireStream(*device);
  Stream worker_stream = RequireStream(*device);

  // The graph writes one 4 KiB chunk of `out` per temporary it allocates in the capture: the
  // first 4 KiB of the temporary, which it filled with its own pattern.
  constexpr size_t kChunk = 4 * kKiB;
  constexpr size_t kMinChunks = 16;
  constexpr size_t kMaxChunks = 256;
  constexpr int kWorkerRounds = 1000;
  void* out = RequireAllocate(pools, kMaxChunks * kChunk, stream);
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));

  std::atomic<bool> go{false};
  std::atomic<bool> done{false};
  WorkerReport report;
  std::thread worker(AllocateInDefaultPool, device.get(), &pools, worker_stream, kWorkerRounds,
                     &go, &done, &report);
  // Lets the worker run to its end and joins it however this thread leaves (a failed REQUIRE
  // throws).
  struct JoinWorker {
    std::atomic<bool>& go;
    std::thread& worker;
    ~JoinWorker() {
      go.store(true);
      if (worker.joinable()) worker.join();
    }
  } join_worker{go, worker};

  PoolId pool;
  std::vector<uint32_t> patterns;
  Graph graph;
  absl::StatusOr<Graph> ended = absl::UnknownError("not ended");
  {
    CaptureOptions options;
    options.mode = mode;
    Capture capture = RequireBegin(*device, pools, stream, options);
    pool = capture.pool();
    go.store(true);
    // Allocate in the capture for as long as the worker runs (within bounds).
    while (patterns.size() < kMinChunks || (!done.load() && patterns.size() < kMaxChunks)) {
      const size_t i = patterns.size();
      const size_t bytes = kChunk + (i % 7) * 96 * kKiB + (i % 3) * 512;
      void* block = RequireAllocate(pools, bytes, stream);
      CHECK(RequirePoolOf(pools, block) == pool);
      const uint32_t pattern = 0x3c000000u | static_cast<uint32_t>(i);
      FillPattern(*device, Address(block), bytes, pattern, stream);
      CopyAsync(*device, static_cast<char*>(out) + i * kChunk, block, kChunk, stream);
      TIDEPOOL_REQUIRE_OK(allocator->Free(block));
      patterns.push_back(pattern);
    }
    worker.join();  // the worker's whole run happens during the capture
    ended = capture.End();
  }
  INFO("worker: " << report.rounds << " rounds, first error: " << report.first_error.ToString());
  CHECK(report.first_error.ok());
  CHECK(report.rounds == kWorkerRounds);
  CHECK(report.wrong_pool == 0);
  CHECK(report.mismatched_words == 0);
  INFO(patterns.size() << " allocations in the capture");
  CHECK(patterns.size() >= kMinChunks);
  INFO("Capture::End (was the capture invalidated?)");
  TIDEPOOL_REQUIRE_OK(ended);
  graph = *std::move(ended);
  CHECK(allocator->captures_underway() == 0);

  const size_t words = patterns.size() * kChunk / 4;
  std::vector<uint32_t> want(words);
  for (size_t i = 0; i < words; ++i) want[i] = patterns[i / (kChunk / 4)];
  for (int replay = 0; replay < 10; ++replay) {
    INFO("replay " << replay);
    FillPattern(*device, Address(out), words * 4, kPoison, stream);
    TIDEPOOL_REQUIRE_OK(graph.Launch(stream));
    const Difference difference = Compare(Download(*device, out, words, stream), want);
    INFO(difference.words << " words differ, the first at " << difference.first);
    REQUIRE(difference.words == 0);
  }

  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
  TIDEPOOL_REQUIRE_OK(graph.Reset());
  CHECK(RequireInfo(pools, pool).released);
  CHECK(ReservedIn(pools, pool) == 0);
  TIDEPOOL_REQUIRE_OK(allocator->Free(out));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  CHECK(allocator->GetStats().reserved_bytes.current == 0);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(worker_stream));
}

// Runs once the driver's one-time costs of captures and copies have been paid (by an empty,
// abandoned capture and a small fill), with the cache empty, and returns the driver's free bytes:
// the baseline the cleanup of a failed capture must come back to.
size_t WarmFreeBytes(CudaDevice& device, PoolManager& pools, Stream stream) {
  {
    Capture warm = RequireBegin(device, pools, stream);
    TIDEPOOL_REQUIRE_OK(warm.Abandon());
  }
  void* block = RequireAllocate(pools, kMiB, stream);
  FillPattern(device, Address(block), kMiB, 0, stream);
  TIDEPOOL_REQUIRE_OK(device.SynchronizeStream(stream));
  TIDEPOOL_REQUIRE_OK(pools.allocator()->Free(block));
  TIDEPOOL_REQUIRE_OK(pools.allocator()->EmptyCache());
  return RequireFreeBytes(device);
}

// After a failed or abandoned capture: its pool is released and unrouted, the blocks it left live
// free normally, the pool's memory goes back, the stream works as before, and the driver's free
// memory is back at `free_before`.
void RequireCleanedUp(CudaDevice& device, PoolManager& pools, Stream stream, PoolId pool,
                      const std::vector<void*>& live, size_t free_before) {
  CachingAllocator* allocator = pools.allocator();
  CHECK(allocator->captures_underway() == 0);
  CHECK_FALSE(IsCapturing(device, stream));
  CHECK(RequireRouteOf(pools, stream) == kDefaultPool);
  PoolInfo info = RequireInfo(pools, pool);
  CHECK(info.references == 0);
  CHECK(info.routes == 0);
  CHECK(info.released);
  CHECK(info.live_blocks == static_cast<int64_t>(live.size()));
  for (void* block : live) {
    CHECK(RequirePoolOf(pools, block) == pool);
    TIDEPOOL_REQUIRE_OK(allocator->Free(block));
  }
  info = RequireInfo(pools, pool);
  CHECK(info.live_blocks == 0);
  CHECK(ReservedIn(pools, pool) == 0);
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());

  // The stream allocates from the default pool again, and its work runs.
  void* block = RequireAllocate(pools, 3 * kMiB, stream);
  CHECK(RequirePoolOf(pools, block) == kDefaultPool);
  FillPattern(device, Address(block), 3 * kMiB, 0x600df00du, stream);
  CHECK(CountMismatches(device, Address(block), 3 * kMiB, 0x600df00du, stream) == 0);
  TIDEPOOL_REQUIRE_OK(allocator->Free(block));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  CHECK(allocator->GetStats().reserved_bytes.current == 0);

  const size_t free_after = RequireFreeBytes(device);
  INFO("driver's free bytes before the capture " << free_before << ", after its cleanup "
                                                 << free_after);
  CHECK(free_after + kFreeMemorySlack >= free_before);
  CHECK(free_before + kFreeMemorySlack >= free_after);
}

TEST_CASE("a capture the driver invalidates leaves nothing behind", "[gpu]") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream stream = RequireStream(*device);
  const size_t free_before = WarmFreeBytes(*device, pools, stream);

  PoolId pool;
  std::vector<void*> live;
  absl::StatusOr<Graph> ended = absl::UnknownError("not ended");
  {
    Capture capture = RequireBegin(*device, pools, stream);
    pool = capture.pool();
    for (size_t bytes : {kMiB, 8 * kMiB + 512, 40 * kMiB}) {
      void* block = RequireAllocate(pools, bytes, stream);
      CHECK(RequirePoolOf(pools, block) == pool);
      FillPattern(*device, Address(block), bytes, 0x1badu, stream);
      live.push_back(block);
    }
    TIDEPOOL_REQUIRE_OK(allocator->Free(live.front()));  // one freed during the capture
    live.erase(live.begin());
    CHECK(RequireInfo(pools, pool).references == 1);

    // Synchronizing a capturing stream is not allowed: the driver refuses and invalidates the
    // capture.
    const CUresult synchronized = device->driver().cuStreamSynchronize(ToCuStream(stream));
    CHECK(synchronized != CUDA_SUCCESS);
    ended = capture.End();
    CHECK_FALSE(capture.active());
  }
  INFO("Capture::End -> " << ended.status().ToString());
  CHECK_FALSE(ended.ok());
  RequireCleanedUp(*device, pools, stream, pool, live, free_before);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

TEST_CASE("an abandoned capture leaves nothing behind", "[gpu]") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  const bool call_abandon = GENERATE(false, true);
  INFO("expandable_segments=" << expandable << ", "
                              << (call_abandon ? "Abandon()" : "Capture destroyed without End"));
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream s1 = RequireStream(*device);
  Stream s2 = RequireStream(*device);
  const size_t free_before = WarmFreeBytes(*device, pools, s1);

  PoolId pool;
  std::vector<void*> live;
  {
    Capture capture = RequireBegin(*device, pools, s1);
    pool = capture.pool();
    void* shared = RequireAllocate(pools, 6 * kMiB, s1);
    FillPattern(*device, Address(shared), 6 * kMiB, 0xab0u, s1);
    Join(*device, s1, s2);
    void* kept = RequireAllocate(pools, 40 * kMiB, s2);
    CHECK(RequirePoolOf(pools, shared) == pool);
    CHECK(RequirePoolOf(pools, kept) == pool);
    CopyAsync(*device, kept, shared, 6 * kMiB, s2);
    // Freed after use on s2: deferred, and its wait begins only after the capture is abandoned.
    TIDEPOOL_REQUIRE_OK(allocator->RecordStream(shared, s2));
    TIDEPOOL_REQUIRE_OK(allocator->Free(shared));
    Join(*device, s2, s1);
    live.push_back(kept);
    CHECK(allocator->captures_underway() == 1);
    if (call_abandon) {
      TIDEPOOL_REQUIRE_OK(capture.Abandon());
      CHECK_FALSE(capture.active());
      TIDEPOOL_REQUIRE_OK(capture.Abandon());  // a second call does nothing
      CHECK(absl::IsFailedPrecondition(capture.End().status()));
    }
  }
  CHECK_FALSE(IsCapturing(*device, s2));
  CHECK(RequireRouteOf(pools, s2) == kDefaultPool);
  RequireCleanedUp(*device, pools, s1, pool, live, free_before);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(s1));
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(s2));
}

// How a thread inside a capture sends its allocations to another pool for a while: a PoolScope,
// or sglang's own order (SymmetricMemoryContext under torch.cuda.graph), which ends the capture's
// route by hand, begins its own pool for the thread, ends and releases it, and resumes with a
// current-thread begin of the capture's pool (docs/graphs.md rules 11 and 13).
enum class Pause { kScope, kByHand };

// The graph copies `in` into a temporary of its own pool, then into a buffer of `symmetric`
// allocated while the capture's routing is paused (sglang's symmetric buffer, which outlives the
// capture), then, after the pause, through a second temporary of its own pool into `out`.
void CaptureAroundAPause(Pause pause) {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream stream = RequireStream(*device);
  const PoolId symmetric = NewUserPoolId();
  TIDEPOOL_REQUIRE_OK(pools.Create(symmetric, PoolOptions{}));

  constexpr size_t kWords = size_t{1} << 16;
  constexpr size_t kBytes = kWords * sizeof(uint32_t);
  void* in = RequireAllocate(pools, kBytes, stream);
  void* out = RequireAllocate(pools, kBytes, stream);
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
  const PoolInfo symmetric_before = RequireInfo(pools, symmetric);

  void* buffer = nullptr;
  Graph graph;
  {
    Capture capture = RequireBegin(*device, pools, stream);
    const PoolInfo graph_before = RequireInfo(pools, capture.pool());
    void* first = RequireAllocate(pools, kBytes, stream);
    CHECK(RequirePoolOf(pools, first) == capture.pool());
    CopyAsync(*device, first, in, kBytes, stream);
    if (pause == Pause::kScope) {
      PoolScope scope(&pools, symmetric);
      TIDEPOOL_REQUIRE_OK(scope.status());
      buffer = RequireAllocate(pools, kBytes, stream);
      CHECK(RequireRouteOf(pools, stream) == symmetric);
      CopyAsync(*device, buffer, first, kBytes, stream);
    } else {
      TIDEPOOL_REQUIRE_OK(pools.End(capture.pool()));
      TIDEPOOL_REQUIRE_OK(pools.Begin(symmetric, RouteFilter::CurrentThread()));
      buffer = RequireAllocate(pools, kBytes, stream);
      CHECK(RequireRouteOf(pools, stream) == symmetric);
      CopyAsync(*device, buffer, first, kBytes, stream);
      TIDEPOOL_REQUIRE_OK(pools.End(symmetric));
      TIDEPOOL_REQUIRE_OK(pools.Release(symmetric));
      TIDEPOOL_REQUIRE_OK(pools.Begin(capture.pool(), RouteFilter::CurrentThread()));
    }
    CHECK(RequirePoolOf(pools, buffer) == symmetric);
    CHECK(RequireRouteOf(pools, stream) == capture.pool());
    void* second = RequireAllocate(pools, kBytes, stream);
    CHECK(RequirePoolOf(pools, second) == capture.pool());
    CopyAsync(*device, second, buffer, kBytes, stream);
    CopyAsync(*device, out, second, kBytes, stream);
    TIDEPOOL_REQUIRE_OK(allocator->Free(first));
    TIDEPOOL_REQUIRE_OK(allocator->Free(second));
    // A scope leaves the capture's pool untouched; the order by hand swapped the capture's route
    // for the resumed one, which took a reference of its own.
    const PoolInfo graph_after = RequireInfo(pools, capture.pool());
    CHECK(graph_after.routes == graph_before.routes);
    CHECK(graph_after.references == graph_before.references + (pause == Pause::kByHand ? 1 : 0));
    graph = RequireEnd(capture);
  }
  // Either way the graph holds the pool's one reference left, and nothing routes to it.
  const PoolId graph_pool = graph.pool();
  const PoolInfo graph_info = RequireInfo(pools, graph_pool);
  CHECK(graph_info.routes == 0);
  CHECK(graph_info.references == 1);
  CHECK(RequireRouteOf(pools, stream) == kDefaultPool);
  const PoolInfo symmetric_after = RequireInfo(pools, symmetric);
  CHECK(symmetric_after.references == symmetric_before.references);
  CHECK(symmetric_after.routes == symmetric_before.routes);
  CHECK(symmetric_after.live_blocks == 1);

  for (int round = 0; round < 20; ++round) {
    INFO("replay " << round);
    const std::vector<uint32_t> input = InputWords(kWords, round);
    Upload(*device, in, input);
    FillPattern(*device, Address(out), kBytes, kPoison, stream);
    FillPattern(*device, Address(buffer), kBytes, kPoison, stream);
    TIDEPOOL_REQUIRE_OK(graph.Launch(stream));
    REQUIRE(Compare(Download(*device, out, kWords, stream), input).words == 0);
    REQUIRE(Compare(Download(*device, buffer, kWords, stream), input).words == 0);
  }

  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
  TIDEPOOL_REQUIRE_OK(graph.Reset());
  CHECK(RequireInfo(pools, graph_pool).gone);
  TIDEPOOL_REQUIRE_OK(allocator->Free(buffer));
  TIDEPOOL_REQUIRE_OK(pools.Release(symmetric));
  CHECK(RequireInfo(pools, symmetric).gone);
  TIDEPOOL_REQUIRE_OK(allocator->Free(in));
  TIDEPOOL_REQUIRE_OK(allocator->Free(out));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

TEST_CASE("a pool scope inside a capture redirects this thread only, and restores the capture's "
          "routing with balanced references", "[gpu]") {
  CaptureAroundAPause(Pause::kScope);
}

TEST_CASE("sglang's own order inside a capture: the capture's route ended by hand, another pool "
          "used, the route resumed by a begin; the capture ends with a graph that replays",
          "[gpu]") {
  CaptureAroundAPause(Pause::kByHand);
}

TEST_CASE("a side stream destroyed while a capture runs, after a deferred free's use on it, is "
          "never touched again", "[gpu]") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream stream = RequireStream(*device);
  Stream side = RequireStream(*device);
  constexpr size_t kWords = size_t{1} << 20;
  constexpr size_t kBytes = kWords * sizeof(uint32_t);
  // A block of the default pool used on `side` (real work, queued before the capture), freed
  // while a capture runs on `stream`: deferred. `side` is destroyed before the capture ends.
  void* shared = RequireAllocate(pools, kBytes, stream);
  TIDEPOOL_REQUIRE_OK(allocator->RecordStream(shared, side));
  for (int i = 0; i < 16; ++i) FillPattern(*device, Address(shared), kBytes, 0x5a5a5a5a, side);
  void* out = RequireAllocate(pools, kBytes, stream);
  Graph graph;
  {
    Capture capture =
        RequireBegin(*device, pools, stream, CaptureOptions{kDefaultPool, CaptureMode::kRelaxed});
    void* temporary = RequireAllocate(pools, kBytes, stream);
    FillPattern(*device, Address(temporary), kBytes, 0x01020304, stream);
    CopyAsync(*device, out, temporary, kBytes, stream);
    TIDEPOOL_REQUIRE_OK(allocator->Free(temporary));
    TIDEPOOL_REQUIRE_OK(allocator->Free(shared));
    TIDEPOOL_REQUIRE_OK(device->DestroyStream(side));  // its work may still be running
    graph = RequireEnd(capture);                          // must not touch `side`
  }
  // The deferred block was waited for (a device synchronization), never through `side`.
  CHECK(allocator->SnapshotJson().find("awaiting_events") == std::string::npos);
  void* again = RequireAllocate(pools, kBytes, stream);
  CHECK(again == shared);
  for (int round = 0; round < 10; ++round) {
    FillPattern(*device, Address(out), kBytes, kPoison, stream);
    TIDEPOOL_REQUIRE_OK(graph.Launch(stream));
    const std::vector<uint32_t> got = Download(*device, out, kWords, stream);
    REQUIRE(Compare(got, std::vector<uint32_t>(kWords, 0x01020304)).words == 0);
  }
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
  TIDEPOOL_REQUIRE_OK(graph.Reset());
  TIDEPOOL_REQUIRE_OK(allocator->Free(again));
  TIDEPOOL_REQUIRE_OK(allocator->Free(out));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

TEST_CASE("a capture that takes new device memory for large blocks ends and replays correctly",
          "[gpu]") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  const bool expandable = GENERATE(false, true);
  INFO("expandable_segments=" << expandable);
  std::unique_ptr<CachingAllocator> allocator = RequireAllocator(*device, expandable);
  PoolManager pools(allocator.get());
  Stream stream = RequireStream(*device);

  // The graph fills big (256 MiB) with kBig and copies `in` into it at 250 MiB, copies big into
  // the front of big2 (384 MiB) and fills the rest of big2 with kRest, then copies
  // big2[248 MiB, 264 MiB) to `out`: 2 MiB of kBig, `in` (4 MiB), 2 MiB of kBig, 8 MiB of kRest.
  constexpr size_t kBigBytes = 256 * kMiB;
  constexpr size_t kBig2Bytes = 384 * kMiB;
  constexpr size_t kInBytes = 4 * kMiB;
  constexpr size_t kOutBytes = 16 * kMiB;
  constexpr size_t kInAt = 250 * kMiB;
  constexpr size_t kOutFrom = 248 * kMiB;
  constexpr uint32_t kBig = 0xb1600000u;
  constexpr uint32_t kRest = 0x4e570000u;
  void* in = RequireAllocate(pools, kInBytes, stream);
  void* out = RequireAllocate(pools, kOutBytes, stream);
  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));

  PoolId pool;
  Graph graph;
  {
    Capture capture = RequireBegin(*device, pools, stream);
    pool = capture.pool();
    CHECK(ReservedIn(pools, pool) == 0);  // a new pool: every byte below is new device memory
    void* big = RequireAllocate(pools, kBigBytes, stream);
    CHECK(RequirePoolOf(pools, big) == pool);
    CHECK(ReservedIn(pools, pool) >= static_cast<int64_t>(kBigBytes));
    FillPattern(*device, Address(big), kBigBytes, kBig, stream);
    CopyAsync(*device, static_cast<char*>(big) + kInAt, in, kInBytes, stream);
    void* big2 = RequireAllocate(pools, kBig2Bytes, stream);
    CHECK(RequirePoolOf(pools, big2) == pool);
    CHECK(ReservedIn(pools, pool) >= static_cast<int64_t>(kBigBytes + kBig2Bytes));
    CopyAsync(*device, big2, big, kBigBytes, stream);
    FillPattern(*device, Address(big2) + kBigBytes, kBig2Bytes - kBigBytes, kRest, stream);
    TIDEPOOL_REQUIRE_OK(allocator->Free(big));
    CopyAsync(*device, out, static_cast<char*>(big2) + kOutFrom, kOutBytes, stream);
    TIDEPOOL_REQUIRE_OK(allocator->Free(big2));
    INFO("Capture::End (did growth during the capture invalidate it?)");
    graph = RequireEnd(capture);
  }
  CHECK(allocator->captures_underway() == 0);
  CHECK(ReservedIn(pools, pool) >= static_cast<int64_t>(kBigBytes + kBig2Bytes));

  std::vector<uint32_t> want(kOutBytes / 4);
  for (int round = 0; round < 5; ++round) {
    INFO("replay " << round);
    const std::vector<uint32_t> input = InputWords(kInBytes / 4, round);
    for (size_t i = 0; i < want.size(); ++i) {
      const size_t at = kOutFrom + i * 4;  // offset in big2
      if (at >= kBigBytes) {
        want[i] = kRest;
      } else if (at >= kInAt && at < kInAt + kInBytes) {
        want[i] = input[(at - kInAt) / 4];
      } else {
        want[i] = kBig;
      }
    }
    Upload(*device, in, input);
    FillPattern(*device, Address(out), kOutBytes, kPoison, stream);
    TIDEPOOL_REQUIRE_OK(graph.Launch(stream));
    const Difference difference = Compare(Download(*device, out, want.size(), stream), want);
    INFO(difference.words << " words differ; the first, word " << difference.first << ", is "
                          << std::hex << difference.got << " for " << difference.want);
    REQUIRE(difference.words == 0);
  }

  TIDEPOOL_REQUIRE_OK(device->SynchronizeStream(stream));
  TIDEPOOL_REQUIRE_OK(graph.Reset());
  CHECK(RequireInfo(pools, pool).released);
  CHECK(ReservedIn(pools, pool) == 0);
  TIDEPOOL_REQUIRE_OK(allocator->Free(in));
  TIDEPOOL_REQUIRE_OK(allocator->Free(out));
  TIDEPOOL_REQUIRE_OK(allocator->EmptyCache());
  CHECK(allocator->GetStats().reserved_bytes.current == 0);
  TIDEPOOL_REQUIRE_OK(device->DestroyStream(stream));
}

}  // namespace
}  // namespace gpu_test
}  // namespace tidepool
