// Symmetric NCCL pools across real ranks, one GPU each (issue 15), in the two layouts programs
// use. It needs a host with two or more GPUs for what it is for; with one GPU it runs as one rank,
// which proves the harness and the one-rank paths, and says which checks it could not make.
//
//   [processes]  one process per GPU, as torchrun and sglang run: each process is one rank, reads
//                TIDEPOOL_RANK and TIDEPOOL_RANKS, and gets each NCCL unique id through a file in
//                TIDEPOOL_NCCL_ID_DIR (rank 0 writes it, the others wait for it). Through the C
//                API, the calls such a program makes:
//                  * correctness: buffers of 4 KiB to 256 MiB from the symmetric pool (reserved,
//                    then grown on demand); each rank prints its offsets and the ranks compare
//                    them (an all-gather); ncclAllReduce sums are right; windows registered ==
//                    segments held; trim deregisters every segment; cuMemGetInfo before and after;
//                  * divergence: the ranks reserve different sizes, and one rank skips a growth:
//                    both fail cleanly on every rank within the agreement timeout, no hang;
//                  * capture: each rank captures a graph that allocates symmetric buffers inside
//                    the capture (sglang's order: symmetric begin / end), reserved beforehand; 100
//                    replays give the right sums;
//                  * benchmark: ncclAllReduce latency on symmetric-pool buffers against cuMemAlloc
//                    buffers (what cudaMalloc gives) at 64 KiB, 1 MiB, 16 MiB and 128 MiB.
//   [local]      one process driving every GPU from one thread (ncclCommInitAll): a
//                SymmetricPoolGroup (nccl/symmetric_group.h) reserves for every local rank at
//                once; offsets equal on every rank; a grouped all-reduce's sums; trim.
//
// tests/gpu_multi/run_symmetric_ranks.sh runs both layouts and reports each process's own exit
// status (it kills nothing by name; each rank ends by its own timeouts). NCCL is the library
// NcclLibrary::Get() opens (TIDEPOOL_NCCL_LIBRARY). Always NCCL_NVLS_ENABLE=0: nothing here may
// create multicast objects.
#include <dlfcn.h>
#include <nccl.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "allocator/cuda_device.h"
#include "catch2/catch.hpp"
#include "integrations/c_api/tidepool.h"
#include "nccl/nccl_agreement.h"
#include "nccl/nccl_library.h"
#include "nccl/symmetric_group.h"
#include "nccl/symmetric_pool.h"
#include "nccl/symmetric_segments.h"
#include "tests/gpu/c_api_checks.h"
#include "tests/gpu/gpu_test_util.h"

namespace tidepool {
namespace {

using gpu_test::CountMismatches;
using gpu_test::FillPattern;
using gpu_test::kKiB;
using gpu_test::kMiB;
using gpu_test::RequireDeviceAt;
using gpu_test::RequireFreeBytes;
using gpu_test::RequireStream;
using gpu_test::StatField;
using gpu_test::StatsOf;

double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

int EnvInt(const char* name, int fallback) {
  const char* value = std::getenv(name);
  return value == nullptr ? fallback : std::atoi(value);
}

// What the tests call of NCCL beyond tidepool's own entry points, from the same library.
struct Nccl {
  const NcclLibrary* library = nullptr;
  decltype(&ncclGetUniqueId) get_unique_id = nullptr;
  decltype(&ncclCommInitRank) init_rank = nullptr;
  decltype(&ncclCommInitAll) init_all = nullptr;
  decltype(&ncclCommDestroy) destroy = nullptr;
  decltype(&ncclAllReduce) all_reduce = nullptr;
};

const Nccl& RequireNccl() {
  static Nccl nccl;
  if (nccl.library != nullptr) return nccl;
  absl::StatusOr<const NcclLibrary*> library = NcclLibrary::Get();
  INFO("NcclLibrary::Get(): " << library.status().ToString());
  REQUIRE(library.ok());
  void* handle = dlopen((*library)->path().c_str(), RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(handle != nullptr);
  nccl.get_unique_id =
      reinterpret_cast<decltype(&ncclGetUniqueId)>(dlsym(handle, "ncclGetUniqueId"));
  nccl.init_rank = reinterpret_cast<decltype(&ncclCommInitRank)>(dlsym(handle, "ncclCommInitRank"));
  nccl.init_all = reinterpret_cast<decltype(&ncclCommInitAll)>(dlsym(handle, "ncclCommInitAll"));
  nccl.destroy = reinterpret_cast<decltype(&ncclCommDestroy)>(dlsym(handle, "ncclCommDestroy"));
  nccl.all_reduce = reinterpret_cast<decltype(&ncclAllReduce)>(dlsym(handle, "ncclAllReduce"));
  REQUIRE((nccl.get_unique_id && nccl.init_rank && nccl.init_all && nccl.destroy &&
           nccl.all_reduce));
  nccl.library = *library;
  return nccl;
}

// This process's rank in the [processes] layout.
struct Rank {
  int rank = 0;
  int ranks = 1;
  std::string id_dir;
};

Rank ThisRank() {
  Rank me;
  me.rank = EnvInt("TIDEPOOL_RANK", 0);
  me.ranks = EnvInt("TIDEPOOL_RANKS", 1);
  const char* dir = std::getenv("TIDEPOOL_NCCL_ID_DIR");
  me.id_dir = dir != nullptr ? dir : "/tmp";
  REQUIRE(me.ranks >= 1);
  REQUIRE(me.rank >= 0);
  REQUIRE(me.rank < me.ranks);
  return me;
}

// The unique id of the communicator called `name`: rank 0 makes it and publishes it whole (a
// rename), the others wait for it for at most a minute.
ncclUniqueId SharedUniqueId(const Nccl& nccl, const Rank& me, const std::string& name) {
  ncclUniqueId id;
  const std::string path = me.id_dir + "/" + name + ".ncclid";
  if (me.rank == 0) {
    REQUIRE(nccl.library->Check(nccl.get_unique_id(&id), "ncclGetUniqueId").ok());
    const std::string partial = path + ".partial";
    {
      std::ofstream out(partial, std::ios::binary);
      out.write(reinterpret_cast<const char*>(&id), sizeof(id));
      REQUIRE(out.good());
    }
    REQUIRE(std::rename(partial.c_str(), path.c_str()) == 0);
    return id;
  }
  const auto start = std::chrono::steady_clock::now();
  for (;;) {
    std::ifstream in(path, std::ios::binary);
    if (in.read(reinterpret_cast<char*>(&id), sizeof(id))) return id;
    INFO("waiting for " << path);
    REQUIRE(MillisecondsSince(start) < 60'000);
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

ncclComm_t RequireCommunicator(const Nccl& nccl, const Rank& me, const std::string& name) {
  const ncclUniqueId id = SharedUniqueId(nccl, me, name);
  ncclComm_t comm = nullptr;
  const auto start = std::chrono::steady_clock::now();
  REQUIRE(nccl.library->Check(nccl.init_rank(&comm, me.ranks, id, me.rank), "ncclCommInitRank")
              .ok());
  std::printf("rank %d/%d: communicator %s made in %.1f ms (NCCL %s)\n", me.rank, me.ranks,
              name.c_str(), MillisecondsSince(start),
              NcclLibrary::VersionText(nccl.library->version()).c_str());
  return comm;
}

void AllReduceU32(const Nccl& nccl, const void* send, void* receive, size_t bytes,
                  ncclComm_t comm, Stream stream) {
  REQUIRE(nccl.library
              ->Check(nccl.all_reduce(send, receive, bytes / 4, ncclUint32, ncclSum, comm,
                                      static_cast<cudaStream_t>(stream)),
                      "ncclAllReduce")
              .ok());
}

// Each rank fills with (rank + 1) * base; the sum over ranks is base * ranks * (ranks + 1) / 2.
uint32_t PatternOf(int rank, uint32_t base) { return base * static_cast<uint32_t>(rank + 1); }
uint32_t SumOf(int ranks, uint32_t base) {
  return base * static_cast<uint32_t>(ranks * (ranks + 1) / 2);
}

// Every rank's `values`, in rank order, through an all-gather of 64-bit words on the device.
std::vector<uint64_t> AllGather(const Nccl& nccl, CudaDevice& device, ncclComm_t comm,
                                const std::vector<uint64_t>& values, int ranks, Stream stream) {
  const size_t bytes = values.size() * sizeof(uint64_t);
  void* send = nullptr;
  void* receive = nullptr;
  REQUIRE_TP(tidepool_malloc(&send, bytes, device.ordinal(), stream));
  REQUIRE_TP(tidepool_malloc(&receive, bytes * ranks, device.ordinal(), stream));
  const CudaDriver& driver = device.driver();
  REQUIRE(device.SynchronizeStream(stream).ok());
  REQUIRE(driver.cuMemcpyHtoD(reinterpret_cast<CUdeviceptr>(send), values.data(), bytes) ==
          CUDA_SUCCESS);
  REQUIRE(nccl.library
              ->Check(nccl.library->ncclAllGather(send, receive, values.size(), ncclUint64, comm,
                                                  static_cast<cudaStream_t>(stream)),
                      "ncclAllGather")
              .ok());
  std::vector<uint64_t> all(values.size() * ranks);
  REQUIRE(driver.cuMemcpyDtoHAsync(all.data(), reinterpret_cast<CUdeviceptr>(receive),
                                   bytes * ranks, static_cast<CUstream>(stream)) == CUDA_SUCCESS);
  REQUIRE(device.SynchronizeStream(stream).ok());
  REQUIRE_TP(tidepool_free(send));
  REQUIRE_TP(tidepool_free(receive));
  return all;
}

// One rank's process in a [processes] test: its device, current, and a stream on it; then one
// or more communicators (Connect) and symmetric pools on them (Pool).
struct RankProcess {
  RankProcess() : me(ThisRank()), nccl(RequireNccl()), device(RequireDeviceAt(me.rank)) {
    REQUIRE(device->MakeCurrent().ok());
    stream = RequireStream(*device);
  }
  ncclComm_t Connect(const std::string& name) { return RequireCommunicator(nccl, me, name); }
  // A symmetric pool on `comm` that grows by `growth_bytes` (0: never on its own), with a first
  // segment of `reserve` bytes (none for 0).
  tidepool_pool_id Pool(ncclComm_t comm, size_t growth_bytes, size_t reserve, double timeout_s) {
    tidepool_pool_id pool{};
    REQUIRE_TP(tidepool_symmetric_pool_create(me.rank, comm, growth_bytes, timeout_s, &pool));
    if (reserve > 0) REQUIRE_TP(tidepool_symmetric_pool_reserve(me.rank, pool, reserve));
    return pool;
  }
  // Destroys `pool`, then `comm`.
  void Close(tidepool_pool_id pool, ncclComm_t comm) {
    REQUIRE_TP(tidepool_symmetric_pool_destroy(me.rank, pool));
    REQUIRE(nccl.library->Check(nccl.destroy(comm), "ncclCommDestroy").ok());
  }
  void End() { REQUIRE(device->DestroyStream(stream).ok()); }

  const Rank me;
  const Nccl& nccl;
  std::unique_ptr<CudaDevice> device;
  Stream stream = nullptr;
};

TEST_CASE("ranks, one process each: offsets alike, sums right, windows == segments, trim",
          "[processes]") {
  RankProcess process;
  const Rank& me = process.me;
  const Nccl& nccl = process.nccl;
  CudaDevice* device = process.device.get();
  Stream stream = process.stream;
  int devices = 0;
  REQUIRE_TP(tidepool_device_count(&devices));
  const size_t free_before = RequireFreeBytes(*device);
  ncclComm_t comm = process.Connect("correctness");
  const size_t free_with_comm = RequireFreeBytes(*device);
  const tidepool_pool_id pool = process.Pool(comm, 64 * kMiB, 64 * kMiB, 30.0);
  const std::vector<size_t> sizes = {4 * kKiB, kMiB, 16 * kMiB, 64 * kMiB, 256 * kMiB};
  std::vector<void*> sends, receives;
  REQUIRE_TP(tidepool_symmetric_begin(me.rank, pool));
  for (size_t bytes : sizes) {
    void* send = nullptr;
    void* receive = nullptr;
    REQUIRE_TP(tidepool_malloc(&send, bytes, me.rank, stream));  // grows on demand, agreed
    REQUIRE_TP(tidepool_malloc(&receive, bytes, me.rank, stream));
    sends.push_back(send);
    receives.push_back(receive);
  }
  REQUIRE_TP(tidepool_symmetric_end(me.rank, pool));

  // Offsets: each rank prints its own, and every rank compares all of them.
  std::vector<uint64_t> offsets;
  std::string printed;
  for (size_t i = 0; i < sizes.size(); ++i) {
    for (void* buffer : {sends[i], receives[i]}) {
      void* window = nullptr;
      size_t offset = 0;
      REQUIRE_TP(tidepool_symmetric_lookup(buffer, &window, &offset));
      CHECK(window != nullptr);
      offsets.push_back(offset);
      printed += absl::StrFormat(" %u", offset);
    }
  }
  std::printf("rank %d/%d: offsets (send, receive per size):%s\n", me.rank, me.ranks,
              printed.c_str());
  const std::vector<uint64_t> every = AllGather(nccl, *device, comm, offsets, me.ranks, stream);
  size_t differing = 0;
  for (int r = 0; r < me.ranks; ++r) {
    for (size_t i = 0; i < offsets.size(); ++i) differing += every[r * offsets.size() + i] != offsets[i];
  }
  std::printf("rank %d/%d: offsets differing from another rank's: %zu of %zu\n", me.rank,
              me.ranks, differing, offsets.size() * me.ranks);
  CHECK(differing == 0);

  for (size_t i = 0; i < sizes.size(); ++i) {
    const uint32_t base = 0x01010101u + static_cast<uint32_t>(i);
    FillPattern(*device, reinterpret_cast<uintptr_t>(sends[i]), sizes[i], PatternOf(me.rank, base),
                stream);
    FillPattern(*device, reinterpret_cast<uintptr_t>(receives[i]), sizes[i], 0, stream);
    AllReduceU32(nccl, sends[i], receives[i], sizes[i], comm, stream);
    const size_t wrong = CountMismatches(*device, reinterpret_cast<uintptr_t>(receives[i]),
                                         sizes[i], SumOf(me.ranks, base), stream);
    std::printf("rank %d/%d: all-reduce of %zu bytes: %zu wrong bytes\n", me.rank, me.ranks,
                sizes[i], wrong);
    CHECK(wrong == 0);
  }
  const std::string stats = StatsOf(me.rank, pool);
  const long long segments = StatField(stats, "segments");
  std::printf("rank %d/%d: segments %lld, windows registered %lld\n", me.rank, me.ranks, segments,
              StatField(stats, "device_allocations") - StatField(stats, "device_frees"));
  CHECK(segments >= 3);
  CHECK(StatField(stats, "device_allocations") - StatField(stats, "device_frees") == segments);
  for (size_t i = 0; i < sizes.size(); ++i) {
    REQUIRE_TP(tidepool_free(sends[i]));
    REQUIRE_TP(tidepool_free(receives[i]));
  }
  REQUIRE_TP(tidepool_symmetric_pool_trim(me.rank, pool));  // collective: every rank trims
  const std::string trimmed = StatsOf(me.rank, pool);
  CHECK(StatField(trimmed, "segments") == 0);
  CHECK(StatField(trimmed, "device_frees") == StatField(trimmed, "device_allocations"));
  REQUIRE_TP(tidepool_empty_cache(me.rank));
  const size_t free_after = RequireFreeBytes(*device);
  std::printf("rank %d/%d: free bytes before the communicator %zu, with it %zu, after trim %zu\n",
              me.rank, me.ranks, free_before, free_with_comm, free_after);
  CHECK(free_after + 64 * kMiB >= free_with_comm);  // NCCL keeps window resources with the comm
  process.Close(pool, comm);
  process.End();
}

TEST_CASE("ranks, one process each: a capture allocates symmetric buffers, 100 replays",
          "[processes]") {
  RankProcess process;
  const Rank& me = process.me;
  CudaDevice* device = process.device.get();
  Stream stream = process.stream;
  ncclComm_t comm = process.Connect("capture");
  // Reserved before capturing: a growth would register a window inside the capture.
  const tidepool_pool_id pool = process.Pool(comm, 64 * kMiB, 64 * kMiB, 30.0);

  constexpr size_t kBytes = 8 * kMiB;
  constexpr uint32_t kBase = 0x00020003u;
  tidepool_capture* capture = nullptr;
  REQUIRE_TP(tidepool_capture_begin(me.rank, stream, nullptr, TIDEPOOL_CAPTURE_MODE_GLOBAL,
                                    &capture));
  REQUIRE_TP(tidepool_symmetric_begin(me.rank, pool));  // sglang's order
  void* send = nullptr;
  void* receive = nullptr;
  REQUIRE_TP(tidepool_malloc(&send, kBytes, me.rank, stream));
  REQUIRE_TP(tidepool_malloc(&receive, kBytes, me.rank, stream));
  // Each replay writes the receive buffer anew: zeroed in the graph, then the all-reduce.
  FillPattern(*device, reinterpret_cast<uintptr_t>(receive), kBytes, 0, stream);
  AllReduceU32(process.nccl, send, receive, kBytes, comm, stream);
  REQUIRE_TP(tidepool_symmetric_end(me.rank, pool));
  tidepool_graph* graph = nullptr;
  REQUIRE_TP(tidepool_capture_end(capture, &graph));

  FillPattern(*device, reinterpret_cast<uintptr_t>(send), kBytes, PatternOf(me.rank, kBase),
              stream);
  size_t wrong_total = 0;
  for (int replay = 0; replay < 100; ++replay) {
    REQUIRE_TP(tidepool_graph_launch(graph, stream));
    if (replay % 25 == 24) {
      wrong_total += CountMismatches(*device, reinterpret_cast<uintptr_t>(receive), kBytes,
                                     SumOf(me.ranks, kBase), stream);
    }
  }
  std::printf("rank %d/%d: 100 replays of a captured all-reduce on symmetric buffers allocated "
              "in the capture: %zu wrong bytes (checked every 25th)\n",
              me.rank, me.ranks, wrong_total);
  CHECK(wrong_total == 0);
  REQUIRE_TP(tidepool_graph_destroy(graph));
  REQUIRE(device->SynchronizeStream(stream).ok());
  REQUIRE_TP(tidepool_free(send));
  REQUIRE_TP(tidepool_free(receive));
  process.Close(pool, comm);
  process.End();
}

TEST_CASE("ranks, one process each: all-reduce latency, symmetric pool against cuMemAlloc",
          "[processes]") {
  RankProcess process;
  const Rank& me = process.me;
  const Nccl& nccl = process.nccl;
  CudaDevice* device = process.device.get();
  Stream stream = process.stream;
  ncclComm_t comm = process.Connect("benchmark");
  const tidepool_pool_id pool = process.Pool(comm, 0, 160 * kMiB, 30.0);
  const CudaDriver& driver = device->driver();
  if (me.rank == 0) {
    std::printf("\n| size | symmetric pool | cuMemAlloc | symmetric / cuMemAlloc |\n"
                "|---|---:|---:|---:|\n");
  }
  for (size_t bytes : {64 * kKiB, kMiB, 16 * kMiB, 128 * kMiB}) {
    void* symmetric = nullptr;
    REQUIRE_TP(tidepool_symmetric_begin(me.rank, pool));
    REQUIRE_TP(tidepool_malloc(&symmetric, bytes, me.rank, stream));
    REQUIRE_TP(tidepool_symmetric_end(me.rank, pool));
    CUdeviceptr plain = 0;
    REQUIRE(driver.cuMemAlloc(&plain, bytes) == CUDA_SUCCESS);
    double microseconds[2];
    void* buffers[2] = {symmetric, reinterpret_cast<void*>(plain)};
    for (int which = 0; which < 2; ++which) {
      FillPattern(*device, reinterpret_cast<uintptr_t>(buffers[which]), bytes, 1, stream);
      for (int i = 0; i < 20; ++i) AllReduceU32(nccl, buffers[which], buffers[which], bytes, comm, stream);
      REQUIRE(device->SynchronizeStream(stream).ok());
      const int iterations = bytes >= 16 * kMiB ? 100 : 1000;
      const auto start = std::chrono::steady_clock::now();
      for (int i = 0; i < iterations; ++i) {
        AllReduceU32(nccl, buffers[which], buffers[which], bytes, comm, stream);
      }
      REQUIRE(device->SynchronizeStream(stream).ok());
      microseconds[which] = MillisecondsSince(start) * 1000.0 / iterations;
    }
    if (me.rank == 0) {
      std::printf("| %zu KiB | %.2f us | %.2f us | %.3f |\n", bytes / kKiB, microseconds[0],
                  microseconds[1], microseconds[0] / microseconds[1]);
    }
    REQUIRE_TP(tidepool_free(symmetric));
    REQUIRE(driver.cuMemFree(plain) == CUDA_SUCCESS);
  }
  REQUIRE(device->SynchronizeStream(stream).ok());
  process.Close(pool, comm);
  process.End();
}

// Divergence needs a second rank. The communicators are fresh and warmed by one all-reduce, so a
// rank that stalls later stalls on a connected peer; the agreement timeout is 5 s.
TEST_CASE("ranks, one process each: diverging ranks fail cleanly within the timeout",
          "[processes]") {
  const Rank me = ThisRank();
  if (me.ranks < 2) {
    WARN("SKIPPED: divergence needs at least two ranks (TIDEPOOL_RANKS=" << me.ranks << ")");
    return;
  }
  RankProcess process;
  const Nccl& nccl = process.nccl;
  CudaDevice* device = process.device.get();
  Stream stream = process.stream;
  auto warmed = [&](const std::string& name) {
    ncclComm_t comm = process.Connect(name);
    void* buffer = nullptr;
    REQUIRE_TP(tidepool_malloc(&buffer, kMiB, me.rank, stream));
    AllReduceU32(nccl, buffer, buffer, kMiB, comm, stream);
    REQUIRE(device->SynchronizeStream(stream).ok());
    REQUIRE_TP(tidepool_free(buffer));
    return comm;
  };

  SECTION("the ranks reserve different sizes") {
    ncclComm_t comm = warmed("diverge-sizes");
    const tidepool_pool_id pool = process.Pool(comm, 0, 0, 5.0);
    const auto start = std::chrono::steady_clock::now();
    const tidepool_status status =
        tidepool_symmetric_pool_reserve(me.rank, pool, (me.rank == 0 ? 32 : 64) * kMiB);
    const double ms = MillisecondsSince(start);
    std::printf("rank %d/%d: reserve of a different size: %s after %.1f ms: %s\n", me.rank,
                me.ranks, tidepool_status_name(status), ms, tidepool_last_error());
    CHECK(status == TIDEPOOL_FAILED_PRECONDITION);
    CHECK(ms < 6000);
    // The pool is broken, everywhere alike: a later step fails at once.
    CHECK(tidepool_symmetric_pool_reserve(me.rank, pool, 32 * kMiB) ==
          TIDEPOOL_FAILED_PRECONDITION);
    process.Close(pool, comm);
  }
  SECTION("one rank skips a growth") {
    ncclComm_t comm = warmed("diverge-skip");
    const tidepool_pool_id pool = process.Pool(comm, 0, 0, 5.0);
    // Rank 0 reserves; the others skip that step and come to the next one after rank 0 gave up.
    if (me.rank != 0) std::this_thread::sleep_for(std::chrono::seconds(7));
    const auto start = std::chrono::steady_clock::now();
    const tidepool_status status = tidepool_symmetric_pool_reserve(me.rank, pool, 32 * kMiB);
    const double ms = MillisecondsSince(start);
    std::printf("rank %d/%d: reserve %s: %s after %.1f ms: %s\n", me.rank, me.ranks,
                me.rank == 0 ? "that the others skipped" : "after skipping rank 0's",
                tidepool_status_name(status), ms, tidepool_last_error());
    CHECK(status != TIDEPOOL_OK);
    CHECK(ms < 6000);
    CHECK(tidepool_symmetric_pool_destroy(me.rank, pool) == TIDEPOOL_OK);
    // The communicator was aborted by the agreement's timeout (nccl/nccl_agreement.h), or is out
    // of step with its peers: it is not destroyed again.
  }
  process.End();
}

TEST_CASE("one process drives every GPU: a group reserves for every local rank at once",
          "[local]") {
  const int ranks = EnvInt("TIDEPOOL_RANKS", 1);
  const Nccl& nccl = RequireNccl();
  std::vector<std::unique_ptr<CudaDevice>> devices;
  std::vector<int> ordinals;
  for (int i = 0; i < ranks; ++i) {
    devices.push_back(RequireDeviceAt(i));
    ordinals.push_back(i);
  }
  std::vector<ncclComm_t> comms(ranks);
  const auto start = std::chrono::steady_clock::now();
  REQUIRE(nccl.library->Check(nccl.init_all(comms.data(), ranks, ordinals.data()),
                              "ncclCommInitAll")
              .ok());
  std::printf("one process, %d GPUs: ncclCommInitAll in %.1f ms\n", ranks,
              MillisecondsSince(start));
  std::vector<Stream> streams;
  for (auto& device : devices) {
    REQUIRE(device->MakeCurrent().ok());
    streams.push_back(RequireStream(*device));
  }
  {
    std::vector<std::unique_ptr<NcclAgreement>> agreements;
    std::vector<std::unique_ptr<SymmetricSegments>> segments;
    std::vector<SymmetricPoolGroup::LocalRank> local;
    for (int i = 0; i < ranks; ++i) {
      absl::StatusOr<std::unique_ptr<NcclAgreement>> agreement =
          NcclAgreement::Create(nccl.library, comms[i], devices[i].get());
      INFO("NcclAgreement::Create: " << agreement.status().ToString());
      REQUIRE(agreement.ok());
      agreements.push_back(*std::move(agreement));
      CudaDevice* raw = devices[i].get();
      segments.push_back(std::make_unique<SymmetricSegments>(
          nccl.library, comms[i], [] { return 0; }, [raw] { return raw->MakeCurrent(); }));
      local.push_back({segments.back().get(), agreements.back().get()});
    }
    SymmetricPool::Options options;
    options.agreement_timeout = absl::Seconds(30);
    absl::StatusOr<std::unique_ptr<SymmetricPoolGroup>> group =
        SymmetricPoolGroup::Create(local, options);
    INFO("SymmetricPoolGroup::Create: " << group.status().ToString());
    REQUIRE(group.ok());
    const auto reserve_start = std::chrono::steady_clock::now();
    absl::Status reserved = (*group)->Reserve(320 * kMiB);
    INFO("group Reserve: " << reserved.ToString());
    REQUIRE(reserved.ok());
    std::printf("group Reserve(320 MiB) for %d local ranks: %.3f ms\n", ranks,
                MillisecondsSince(reserve_start));
    const std::vector<size_t> sizes = {4 * kKiB, kMiB, 16 * kMiB, 64 * kMiB, 128 * kMiB};
    std::vector<std::vector<void*>> buffers(ranks);
    size_t differing = 0;
    for (size_t s = 0; s < sizes.size(); ++s) {
      for (int i = 0; i < ranks; ++i) {
        absl::StatusOr<void*> buffer = (*group)->pool(i).Allocate(sizes[s]);
        INFO("Allocate(" << sizes[s] << ") on local rank " << i << ": "
                         << buffer.status().ToString());
        REQUIRE(buffer.ok());
        buffers[i].push_back(*buffer);
      }
      absl::StatusOr<SymmetricPool::Location> first = (*group)->pool(0).Lookup(buffers[0][s]);
      REQUIRE(first.ok());
      for (int i = 1; i < ranks; ++i) {
        absl::StatusOr<SymmetricPool::Location> where = (*group)->pool(i).Lookup(buffers[i][s]);
        REQUIRE(where.ok());
        differing += where->segment != first->segment || where->offset != first->offset;
      }
    }
    std::printf("one process, %d GPUs: offsets differing between local ranks: %zu\n", ranks,
                differing);
    CHECK(differing == 0);
    for (size_t s = 0; s < sizes.size(); ++s) {
      const uint32_t base = 0x00030005u + static_cast<uint32_t>(s);
      for (int i = 0; i < ranks; ++i) {
        REQUIRE(devices[i]->MakeCurrent().ok());
        FillPattern(*devices[i], reinterpret_cast<uintptr_t>(buffers[i][s]), sizes[s],
                    PatternOf(i, base), streams[i]);
      }
      REQUIRE(nccl.library->Check(nccl.library->ncclGroupStart(), "ncclGroupStart").ok());
      for (int i = 0; i < ranks; ++i) {
        REQUIRE(nccl.library
                    ->Check(nccl.all_reduce(buffers[i][s], buffers[i][s], sizes[s] / 4,
                                            ncclUint32, ncclSum, comms[i],
                                            static_cast<cudaStream_t>(streams[i])),
                            "ncclAllReduce")
                    .ok());
      }
      REQUIRE(nccl.library->Check(nccl.library->ncclGroupEnd(), "ncclGroupEnd").ok());
      size_t wrong = 0;
      for (int i = 0; i < ranks; ++i) {
        REQUIRE(devices[i]->MakeCurrent().ok());
        wrong += CountMismatches(*devices[i], reinterpret_cast<uintptr_t>(buffers[i][s]),
                                 sizes[s], SumOf(ranks, base), streams[i]);
      }
      std::printf("one process, %d GPUs: grouped all-reduce of %zu bytes: %zu wrong bytes\n",
                  ranks, sizes[s], wrong);
      CHECK(wrong == 0);
    }
    for (int i = 0; i < ranks; ++i) {
      for (void* buffer : buffers[i]) REQUIRE((*group)->pool(i).Free(buffer).ok());
    }
    absl::Status trimmed = (*group)->Trim();
    INFO("group Trim: " << trimmed.ToString());
    REQUIRE(trimmed.ok());
    for (int i = 0; i < ranks; ++i) {
      CHECK((*group)->pool(i).GetStats().segments == 0);
      CHECK(segments[i]->registrations() == segments[i]->deregistrations());
      CHECK(segments[i]->registrations() >= 1);
    }
  }
  for (int i = 0; i < ranks; ++i) {
    REQUIRE(devices[i]->MakeCurrent().ok());
    REQUIRE(devices[i]->DestroyStream(streams[i]).ok());
    REQUIRE(nccl.library->Check(nccl.destroy(comms[i]), "ncclCommDestroy").ok());
  }
}

}  // namespace
}  // namespace tidepool
