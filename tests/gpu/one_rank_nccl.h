// A one-rank NCCL communicator for the GPU tests: the one shape one GPU allows (two ranks on one
// GPU are refused by NCCL: docs/background.md §4). NCCL is the library NcclLibrary::Get() opens
// (TIDEPOOL_NCCL_LIBRARY, which run_gpu_tests.sh points at the NCCL in Python's site-packages);
// what only the tests call (making and ending a communicator, one collective) is resolved from
// that same library.
#ifndef TIDEPOOL_TESTS_GPU_ONE_RANK_NCCL_H_
#define TIDEPOOL_TESTS_GPU_ONE_RANK_NCCL_H_

#include <dlfcn.h>
#include <nccl.h>

#include <chrono>
#include <cstdio>

#include "catch2/catch.hpp"
#include "nccl/nccl_library.h"

namespace tidepool {
namespace gpu_test {

struct OneRank {
  const NcclLibrary* nccl = nullptr;
  decltype(&ncclAllReduce) all_reduce = nullptr;
  decltype(&ncclCommDestroy) destroy = nullptr;
  ncclComm_t comm = nullptr;
};

inline double MillisecondsSince(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
      .count();
}

// Makes a one-rank communicator on the current device; the test fails here if it cannot.
inline OneRank RequireOneRankCommunicator() {
  OneRank one;
  absl::StatusOr<const NcclLibrary*> nccl = NcclLibrary::Get();
  INFO("NcclLibrary::Get(): " << nccl.status().ToString());
  REQUIRE(nccl.ok());
  one.nccl = *nccl;
  void* handle = dlopen(one.nccl->path().c_str(), RTLD_NOW | RTLD_NOLOAD);
  REQUIRE(handle != nullptr);
  auto get_unique_id =
      reinterpret_cast<decltype(&ncclGetUniqueId)>(dlsym(handle, "ncclGetUniqueId"));
  auto init_rank =
      reinterpret_cast<decltype(&ncclCommInitRank)>(dlsym(handle, "ncclCommInitRank"));
  one.destroy = reinterpret_cast<decltype(&ncclCommDestroy)>(dlsym(handle, "ncclCommDestroy"));
  one.all_reduce = reinterpret_cast<decltype(&ncclAllReduce)>(dlsym(handle, "ncclAllReduce"));
  REQUIRE((get_unique_id != nullptr && init_rank != nullptr && one.destroy != nullptr &&
           one.all_reduce != nullptr));
  ncclUniqueId id;
  REQUIRE(one.nccl->Check(get_unique_id(&id), "ncclGetUniqueId").ok());
  const auto start = std::chrono::steady_clock::now();
  REQUIRE(one.nccl->Check(init_rank(&one.comm, 1, id, 0), "ncclCommInitRank(1 rank)").ok());
  std::printf("NCCL %s from %s; ncclCommInitRank (1 rank): %.1f ms\n",
              NcclLibrary::VersionText(one.nccl->version()).c_str(), one.nccl->path().c_str(),
              MillisecondsSince(start));
  return one;
}

}  // namespace gpu_test
}  // namespace tidepool

#endif  // TIDEPOOL_TESTS_GPU_ONE_RANK_NCCL_H_
