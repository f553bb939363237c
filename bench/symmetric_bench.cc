// The symmetric NCCL pool against what it saves: a cached malloc + free from a symmetric pool,
// through the C API a program calls (tidepool_symmetric_begin, then tidepool_malloc /
// tidepool_free), against making a symmetric buffer the uncached way, ncclMemAlloc +
// ncclCommWindowRegister(NCCL_WIN_COLL_SYMMETRIC) and then ncclCommWindowDeregister +
// ncclMemFree, as a pool without caching (or sglang's plugin, per segment) pays. The ordinary
// tidepool_malloc pair on the default pool is measured in the same run for scale.
//
// One GPU, one rank: a one-rank communicator (the only shape one GPU allows). NCCL is the
// library TIDEPOOL_NCCL_LIBRARY names (else libnccl.so.2). Prints a markdown table; pass
// --quick for a short run.
#include <dlfcn.h>
#include <nccl.h>

#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "bench/pair_benchmark.h"
#include "integrations/c_api/tidepool.h"
#include "nccl/nccl_library.h"

namespace tidepool {
namespace bench {
namespace {

void Require(tidepool_status status, const char* what) {
  if (status != TIDEPOOL_OK) {
    Fail(std::string(what) + ": " + tidepool_status_name(status) + ": " + tidepool_last_error());
  }
}

void Require(const absl::Status& status) {
  if (!status.ok()) Fail(status.ToString());
}

// Median nanoseconds per cached pair, batches of `pairs`.
double CachedPair(size_t bytes, int pairs, int batches) {
  std::vector<double> per_pair;
  for (int batch = 0; batch < batches; ++batch) {
    const Clock::time_point start = Clock::now();
    for (int i = 0; i < pairs; ++i) {
      void* block = nullptr;
      Require(tidepool_malloc(&block, bytes, 0, nullptr), "tidepool_malloc");
      Require(tidepool_free(block), "tidepool_free");
    }
    per_pair.push_back(NanosecondsBetween(start, Clock::now()) / pairs);
  }
  return Median(per_pair);
}

struct Uncached {
  double make_us = 0;     // ncclMemAlloc + ncclCommWindowRegister
  double unmake_us = 0;   // ncclCommWindowDeregister + ncclMemFree
};

Uncached UncachedPair(const NcclLibrary& nccl, ncclComm_t comm, size_t bytes, int repetitions) {
  std::vector<double> make;
  std::vector<double> unmake;
  for (int i = 0; i < repetitions; ++i) {
    void* memory = nullptr;
    ncclWindow_t window = nullptr;
    const Clock::time_point start = Clock::now();
    Require(nccl.Check(nccl.ncclMemAlloc(&memory, bytes), "ncclMemAlloc"));
    Require(nccl.Check(nccl.ncclCommWindowRegister(comm, memory, bytes, &window,
                                                   NCCL_WIN_COLL_SYMMETRIC),
                       "ncclCommWindowRegister"));
    const Clock::time_point made = Clock::now();
    if (window == nullptr) Fail("NCCL gave a NULL window: no symmetric support");
    Require(nccl.Check(nccl.ncclCommWindowDeregister(comm, window), "ncclCommWindowDeregister"));
    Require(nccl.Check(nccl.ncclMemFree(memory), "ncclMemFree"));
    make.push_back(NanosecondsBetween(start, made) / 1000);
    unmake.push_back(NanosecondsBetween(made, Clock::now()) / 1000);
  }
  return Uncached{Median(make), Median(unmake)};
}

int Main(int argc, char** argv) {
  const bool quick = argc > 1 && std::strcmp(argv[1], "--quick") == 0;
  const int pairs = quick ? 1000 : 10000;
  const int batches = quick ? 11 : 51;
  const int repetitions = quick ? 5 : 21;

  int devices = 0;
  Require(tidepool_device_count(&devices), "tidepool_device_count");  // the runtime, on GPU 0
  absl::StatusOr<const NcclLibrary*> nccl = NcclLibrary::Get();
  if (!nccl.ok()) Fail(nccl.status().ToString());
  void* handle = dlopen((*nccl)->path().c_str(), RTLD_NOW | RTLD_NOLOAD);
  auto get_unique_id =
      reinterpret_cast<decltype(&ncclGetUniqueId)>(dlsym(handle, "ncclGetUniqueId"));
  auto init_rank =
      reinterpret_cast<decltype(&ncclCommInitRank)>(dlsym(handle, "ncclCommInitRank"));
  auto destroy = reinterpret_cast<decltype(&ncclCommDestroy)>(dlsym(handle, "ncclCommDestroy"));
  if (get_unique_id == nullptr || init_rank == nullptr || destroy == nullptr) {
    Fail("NCCL lacks ncclGetUniqueId, ncclCommInitRank or ncclCommDestroy");
  }
  ncclUniqueId id;
  Require((*nccl)->Check(get_unique_id(&id), "ncclGetUniqueId"));
  ncclComm_t comm = nullptr;
  Require((*nccl)->Check(init_rank(&comm, 1, id, 0), "ncclCommInitRank"));
  std::printf("NCCL %s from %s, one rank\n\n",
              NcclLibrary::VersionText((*nccl)->version()).c_str(), (*nccl)->path().c_str());

  // The first registration builds NCCL's symmetric resources: pay it before measuring.
  (void)UncachedPair(**nccl, comm, size_t{1} << 20, 1);

  const std::vector<size_t> sizes = {size_t{4} << 10, size_t{1} << 20, size_t{64} << 20};
  std::vector<double> ordinary;
  for (size_t bytes : sizes) ordinary.push_back(CachedPair(bytes, pairs, batches));

  tidepool_pool_id pool{};
  Require(tidepool_symmetric_pool_create(0, comm, 0, 30.0, &pool),
          "tidepool_symmetric_pool_create");
  Require(tidepool_symmetric_pool_reserve(0, pool, size_t{128} << 20),
          "tidepool_symmetric_pool_reserve");
  Require(tidepool_symmetric_begin(0, pool), "tidepool_symmetric_begin");
  std::vector<double> symmetric;
  for (size_t bytes : sizes) symmetric.push_back(CachedPair(bytes, pairs, batches));
  Require(tidepool_symmetric_end(0, pool), "tidepool_symmetric_end");
  Require(tidepool_symmetric_pool_destroy(0, pool), "tidepool_symmetric_pool_destroy");

  std::printf("| size | tidepool symmetric pool, cached malloc + free (C API) | tidepool default "
              "pool, cached pair (C API) | ncclMemAlloc + WindowRegister | WindowDeregister + "
              "ncclMemFree | uncached total / symmetric cached |\n");
  std::printf("|---|---:|---:|---:|---:|---:|\n");
  for (size_t i = 0; i < sizes.size(); ++i) {
    const Uncached uncached = UncachedPair(**nccl, comm, sizes[i], repetitions);
    std::printf("| %zu KiB | %.1f ns | %.1f ns | %.1f us | %.1f us | %.0fx |\n", sizes[i] >> 10,
                symmetric[i], ordinary[i], uncached.make_us, uncached.unmake_us,
                (uncached.make_us + uncached.unmake_us) * 1000 / symmetric[i]);
  }
  Require((*nccl)->Check(destroy(comm), "ncclCommDestroy"));
  return 0;
}

}  // namespace
}  // namespace bench
}  // namespace tidepool

int main(int argc, char** argv) { return tidepool::bench::Main(argc, argv); }
