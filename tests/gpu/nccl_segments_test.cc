// Symmetric segments on a real GPU with the real NCCL, through a one-rank communicator (the one
// shape one GPU allows: docs/background.md §4): NCCL is found (TIDEPOOL_NCCL_LIBRARY, which
// run_gpu_tests.sh points at the NCCL in Python's site-packages), segments of 4 KiB to
// 256 MiB are allocated and registered as symmetric windows, an in-place ncclAllReduce on each
// gives the right values, every segment is deregistered and freed, and the device's free memory
// comes back. Prints what registration and deregistration cost. Then a symmetric pool over the
// same kind of communicator, and a group of local ranks (nccl/symmetric_group.h) doing its
// exchanges, registration and deregistration inside NCCL groups.
#include <nccl.h>

#include <chrono>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "allocator/cuda_device.h"
#include "catch2/catch.hpp"
#include "nccl/nccl_agreement.h"
#include "nccl/nccl_library.h"
#include "nccl/symmetric_group.h"
#include "nccl/symmetric_pool.h"
#include "nccl/symmetric_segments.h"
#include "tests/gpu/gpu_test_util.h"
#include "tests/gpu/one_rank_nccl.h"

namespace tidepool {
namespace {

using gpu_test::CountMismatches;
using gpu_test::MillisecondsSince;
using gpu_test::OneRank;
using gpu_test::RequireOneRankCommunicator;
using gpu_test::FillPattern;
using gpu_test::RequireDevice;
using gpu_test::RequireFreeBytes;
using gpu_test::RequireStream;

TEST_CASE("symmetric windows on one GPU: register, all-reduce, deregister, nothing leaks") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  REQUIRE(device->MakeCurrent().ok());
  Stream stream = RequireStream(*device);
  const size_t free_before = RequireFreeBytes(*device);
  const OneRank one = RequireOneRankCommunicator();
  ncclComm_t comm = one.comm;
  auto all_reduce = one.all_reduce;
  const size_t free_with_comm = RequireFreeBytes(*device);

  {
    SymmetricSegments segments(one.nccl, comm, [] { return 0; });
    std::vector<SymmetricSegment> made;
    for (size_t bytes : {size_t{4} << 10, size_t{1} << 20, size_t{64} << 20, size_t{256} << 20}) {
      const auto start = std::chrono::steady_clock::now();
      absl::StatusOr<SymmetricSegment> segment = segments.Create(bytes);
      const double create_ms = MillisecondsSince(start);
      INFO("Create(" << bytes << "): " << segment.status().ToString());
      REQUIRE(segment.ok());
      CHECK(segment->window != nullptr);
      std::printf("segment of %zu bytes: ncclMemAlloc + ncclCommWindowRegister %.3f ms\n", bytes,
                  create_ms);
      // In place, one rank: the sum is the value itself, computed by NCCL on the window.
      const uint32_t pattern = 0x01020304u + static_cast<uint32_t>(made.size());
      FillPattern(*device, segment->base, bytes, pattern, stream);
      REQUIRE(one.nccl
                  ->Check(all_reduce(reinterpret_cast<void*>(segment->base),
                                     reinterpret_cast<void*>(segment->base), bytes / 4, ncclUint32,
                                     ncclSum, comm, static_cast<cudaStream_t>(stream)),
                          "ncclAllReduce")
                  .ok());
      CHECK(CountMismatches(*device, segment->base, bytes / 4 * 4, pattern, stream) == 0);
      made.push_back(*segment);
    }
    CHECK(segments.registrations() == 4);
    CHECK(segments.segments().size() == 4);
    for (const SymmetricSegment& segment : made) {
      const auto start = std::chrono::steady_clock::now();
      REQUIRE(segments.Destroy(segment).ok());
      std::printf("segment of %zu bytes: ncclCommWindowDeregister + ncclMemFree %.3f ms\n",
                  segment.bytes, MillisecondsSince(start));
    }
    CHECK(segments.deregistrations() == 4);
    CHECK(segments.segments().empty());
  }
  const size_t free_after_segments = RequireFreeBytes(*device);
  std::printf("free bytes: before the communicator %zu, with it %zu, after the segments %zu\n",
              free_before, free_with_comm, free_after_segments);
  // Every segment's memory is back (NCCL's own resources for windows stay with the
  // communicator, which goes next).
  CHECK(free_after_segments + (size_t{64} << 20) >= free_with_comm);
  REQUIRE(one.nccl->Check(one.destroy(comm), "ncclCommDestroy").ok());
  REQUIRE(device->DestroyStream(stream).ok());
}

TEST_CASE("a symmetric pool over a one-rank communicator: agreed growth, placement, trim") {
  std::unique_ptr<CudaDevice> device = RequireDevice();
  REQUIRE(device->MakeCurrent().ok());
  Stream stream = RequireStream(*device);
  const OneRank one = RequireOneRankCommunicator();
  ncclComm_t comm = one.comm;
  auto all_reduce = one.all_reduce;
  {
    absl::StatusOr<std::unique_ptr<NcclAgreement>> agreement =
        NcclAgreement::Create(one.nccl, comm, device.get());
    INFO("NcclAgreement::Create: " << agreement.status().ToString());
    REQUIRE(agreement.ok());
    CHECK((*agreement)->ranks() == 1);
    CHECK((*agreement)->rank() == 0);
    SymmetricSegments segments(one.nccl, comm, [] { return 0; });
    SymmetricPool::Options options;
    options.growth_bytes = size_t{64} << 20;
    options.agreement_timeout = absl::Seconds(10);
    SymmetricPool pool(&segments, agreement->get(), options);
    const auto reserve_start = std::chrono::steady_clock::now();
    REQUIRE(pool.Reserve(size_t{64} << 20).ok());
    std::printf("pool Reserve(64 MiB), agreement included: %.3f ms\n",
                MillisecondsSince(reserve_start));
    absl::StatusOr<void*> first = pool.Allocate(4096);
    absl::StatusOr<void*> second = pool.Allocate(size_t{1} << 20);
    REQUIRE(first.ok());
    REQUIRE(second.ok());
    absl::StatusOr<SymmetricPool::Location> where = pool.Lookup(*second);
    REQUIRE(where.ok());
    CHECK(where->segment == 0);
    CHECK(where->offset == 4096);  // first fit after the 4 KiB block
    CHECK(where->window != nullptr);
    // A collective on a pool buffer, in place.
    FillPattern(*device, reinterpret_cast<uintptr_t>(*second), size_t{1} << 20, 0x0a0b0c0du,
                stream);
    REQUIRE(one.nccl
                ->Check(all_reduce(*second, *second, (size_t{1} << 20) / 4, ncclUint32, ncclSum,
                                   comm, static_cast<cudaStream_t>(stream)),
                        "ncclAllReduce")
                .ok());
    CHECK(CountMismatches(*device, reinterpret_cast<uintptr_t>(*second), size_t{1} << 20,
                          0x0a0b0c0du, stream) == 0);
    // On demand: 96 MiB does not fit the reserve, so the pool grows (agreed with itself).
    absl::StatusOr<void*> large = pool.Allocate(size_t{96} << 20);
    REQUIRE(large.ok());
    CHECK(pool.GetStats().segments == 2);
    CHECK(pool.GetStats().growths == 1);
    // The cached pair, the pool's hot path.
    constexpr int kPairs = 200000;
    const auto pairs_start = std::chrono::steady_clock::now();
    for (int i = 0; i < kPairs; ++i) {
      absl::StatusOr<void*> block = pool.Allocate(size_t{1} << 20);
      if (!block.ok() || !pool.Free(*block).ok()) FAIL("a cached pair failed");
    }
    std::printf("cached symmetric-pool Allocate + Free (1 MiB): %.1f ns per pair\n",
                MillisecondsSince(pairs_start) * 1e6 / kPairs);
    for (absl::StatusOr<void*>* block : {&first, &second, &large}) {
      REQUIRE(pool.Free(**block).ok());
    }
    REQUIRE(pool.Trim().ok());
    CHECK(pool.GetStats().segments == 0);
    CHECK(segments.registrations() == 2);
    CHECK(segments.deregistrations() == 2);
  }
  REQUIRE(one.nccl->Check(one.destroy(comm), "ncclCommDestroy").ok());
  REQUIRE(device->DestroyStream(stream).ok());
}

TEST_CASE("a group of local ranks over the real NCCL: group exchange, registration, trim") {
  // One GPU gives one rank, so the group has one local rank: what this proves is that the group
  // path (every exchange's all-gather, registration and deregistration between ncclGroupStart
  // and ncclGroupEnd, windows read after group end) works against the real library.
  std::unique_ptr<CudaDevice> device = RequireDevice();
  REQUIRE(device->MakeCurrent().ok());
  Stream stream = RequireStream(*device);
  const OneRank one = RequireOneRankCommunicator();
  {
    absl::StatusOr<std::unique_ptr<NcclAgreement>> agreement =
        NcclAgreement::Create(one.nccl, one.comm, device.get());
    REQUIRE(agreement.ok());
    CudaDevice* raw_device = device.get();
    SymmetricSegments segments(one.nccl, one.comm, [] { return 0; },
                               [raw_device] { return raw_device->MakeCurrent(); });
    SymmetricPool::Options options;
    options.agreement_timeout = absl::Seconds(10);
    absl::StatusOr<std::unique_ptr<SymmetricPoolGroup>> group =
        SymmetricPoolGroup::Create({{&segments, agreement->get()}}, options);
    INFO("SymmetricPoolGroup::Create: " << group.status().ToString());
    REQUIRE(group.ok());
    const auto start = std::chrono::steady_clock::now();
    absl::Status reserved = (*group)->Reserve(size_t{32} << 20);
    INFO("group Reserve: " << reserved.ToString());
    REQUIRE(reserved.ok());
    std::printf("group Reserve(32 MiB) of one local rank, three grouped exchanges included: "
                "%.3f ms\n",
                MillisecondsSince(start));
    SymmetricPool& pool = (*group)->pool(0);
    absl::StatusOr<void*> buffer = pool.Allocate(size_t{4} << 20);
    REQUIRE(buffer.ok());
    absl::StatusOr<SymmetricPool::Location> where = pool.Lookup(*buffer);
    REQUIRE(where.ok());
    CHECK(where->window != nullptr);
    FillPattern(*device, reinterpret_cast<uintptr_t>(*buffer), size_t{4} << 20, 0x77665544u,
                stream);
    REQUIRE(one.nccl
                ->Check(one.all_reduce(*buffer, *buffer, (size_t{4} << 20) / 4, ncclUint32,
                                       ncclSum, one.comm, static_cast<cudaStream_t>(stream)),
                        "ncclAllReduce")
                .ok());
    CHECK(CountMismatches(*device, reinterpret_cast<uintptr_t>(*buffer), size_t{4} << 20,
                          0x77665544u, stream) == 0);
    // A pool of a group never grows on its own.
    CHECK(absl::IsResourceExhausted(pool.Allocate(size_t{64} << 20).status()));
    REQUIRE(pool.Free(*buffer).ok());
    REQUIRE((*group)->Trim().ok());
    CHECK(pool.GetStats().segments == 0);
    CHECK(segments.registrations() == 1);
    CHECK(segments.deregistrations() == 1);
  }
  REQUIRE(one.nccl->Check(one.destroy(one.comm), "ncclCommDestroy").ok());
  REQUIRE(device->DestroyStream(stream).ok());
}

}  // namespace
}  // namespace tidepool
