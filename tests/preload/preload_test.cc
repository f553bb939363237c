// libtidepool_preload.so on the CPU, run under LD_PRELOAD by preload_test.sh with a stand-in
// driver (stub_driver.c, through TIDEPOOL_LIBCUDA) and libtidepool.so.1's simulated runtime:
//   * dlsym answers "cuGetProcAddress" and "cuGetProcAddress_v2" with the interposer's own, and
//     everything else with the library's own symbol;
//   * cuGetProcAddress answers the served functions, the self-lookup of "cuGetProcAddress"
//     included, with the interposer's, and the rest with the driver's;
//   * an allocation through them comes from tidepool, and its free goes back to tidepool;
//   * a pointer tidepool does not own is passed to the driver's free (synchronous and async);
//   * cuMemGetInfo counts tidepool's cached bytes as free;
//   * cudaMalloc / cudaFree exported for shared-cudart programs serve from tidepool too;
//   * in a child after fork, every call goes to the driver and the parent's state is untouched.
// Prints "preload_test: N checks passed" or the failures, and exits non-zero on any.
#include <cuda.h>
#undef cuGetProcAddress
#include <dlfcn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>

#include "integrations/c_api/tidepool.h"

namespace {

int failures = 0;
int checks = 0;

void Check(bool ok, const std::string& what) {
  ++checks;
  if (!ok) {
    ++failures;
    std::printf("FAILED: %s (last tidepool error: %s)\n", what.c_str(), tidepool_last_error());
  }
}

std::string LibraryOf(const void* address) {
  Dl_info info;
  if (dladdr(address, &info) == 0 || info.dli_fname == nullptr) return "?";
  return info.dli_fname;
}

bool FromInterposer(const void* address) {
  return LibraryOf(address).find("libtidepool_preload.so") != std::string::npos;
}

bool OwnedByTidepool(CUdeviceptr ptr) {
  int device = -1;
  tidepool_pool_id pool;
  return tidepool_pool_of(reinterpret_cast<void*>(ptr), &device, &pool) == TIDEPOOL_OK;
}

long Counter(void* stub, const char* name) { return *static_cast<long*>(dlsym(stub, name)); }

}  // namespace

int main() {
  Check(tidepool_init_simulated(1, size_t{1} << 30) == TIDEPOOL_OK, "simulated runtime");
  const char* stub_path = std::getenv("TIDEPOOL_LIBCUDA");
  void* stub = stub_path != nullptr ? dlopen(stub_path, RTLD_NOW) : nullptr;
  Check(stub != nullptr, "the stand-in driver loads");
  if (stub == nullptr) return 1;

  // dlsym's answers.
  void* get_proc = dlsym(stub, "cuGetProcAddress_v2");
  Check(FromInterposer(get_proc), "dlsym(libcuda, \"cuGetProcAddress_v2\") is the interposer's");
  Check(FromInterposer(dlsym(stub, "cuGetProcAddress")),
        "dlsym(libcuda, \"cuGetProcAddress\") is the interposer's");
  void* plain = dlsym(stub, "cuCtxGetCurrent");
  Check(plain != nullptr && LibraryOf(plain).find("stub") != std::string::npos,
        "dlsym of anything else is the library's own: " + LibraryOf(plain));

  // cuGetProcAddress's answers.
  auto lookup = reinterpret_cast<decltype(&cuGetProcAddress_v2)>(get_proc);
  void* fn = nullptr;
  Check(lookup("cuGetProcAddress", &fn, 12000, 0, nullptr) == CUDA_SUCCESS && FromInterposer(fn),
        "the self-lookup of cuGetProcAddress gets the interposer's");
  void* mem_alloc = nullptr;
  void* mem_free = nullptr;
  void* alloc_async = nullptr;
  void* free_async = nullptr;
  void* get_info = nullptr;
  lookup("cuMemAlloc", &mem_alloc, 12000, 0, nullptr);
  lookup("cuMemFree", &mem_free, 12000, 0, nullptr);
  lookup("cuMemAllocAsync", &alloc_async, 12000, 0, nullptr);
  lookup("cuMemFreeAsync", &free_async, 12000, 0, nullptr);
  lookup("cuMemGetInfo", &get_info, 12000, 0, nullptr);
  Check(FromInterposer(mem_alloc) && FromInterposer(mem_free) && FromInterposer(alloc_async) &&
            FromInterposer(free_async) && FromInterposer(get_info),
        "cuGetProcAddress answers the served functions with the interposer's");
  void* context = nullptr;
  lookup("cuCtxGetCurrent", &context, 12000, 0, nullptr);
  Check(context == plain, "cuGetProcAddress answers the others with the driver's");

  // Served allocations come from tidepool and go back to it.
  auto alloc = reinterpret_cast<decltype(&cuMemAlloc_v2)>(mem_alloc);
  auto free_fn = reinterpret_cast<decltype(&cuMemFree_v2)>(mem_free);
  CUdeviceptr block = 0;
  Check(alloc(&block, size_t{1} << 20) == CUDA_SUCCESS && OwnedByTidepool(block),
        "cuMemAlloc is served by tidepool");
  Check(free_fn(block) == CUDA_SUCCESS && !OwnedByTidepool(block),
        "cuMemFree gives it back to tidepool");
  auto alloc_async_fn = reinterpret_cast<decltype(&cuMemAllocAsync)>(alloc_async);
  auto free_async_fn = reinterpret_cast<decltype(&cuMemFreeAsync)>(free_async);
  CUdeviceptr async_block = 0;
  Check(alloc_async_fn(&async_block, 4096, nullptr) == CUDA_SUCCESS &&
            OwnedByTidepool(async_block),
        "cuMemAllocAsync is served by tidepool");
  Check(free_async_fn(async_block, nullptr) == CUDA_SUCCESS && !OwnedByTidepool(async_block),
        "cuMemFreeAsync gives it back to tidepool");
  Check(Counter(stub, "stub_allocations") == 0 && Counter(stub, "stub_async_allocations") == 0,
        "the driver allocated nothing for them");

  // Foreign pointers go to the driver.
  auto stub_alloc = reinterpret_cast<decltype(&cuMemAlloc_v2)>(dlsym(stub, "cuMemAlloc_v2"));
  Check(!FromInterposer(reinterpret_cast<void*>(stub_alloc)), "the driver's own cuMemAlloc");
  CUdeviceptr foreign = 0;
  stub_alloc(&foreign, 8192);
  Check(!OwnedByTidepool(foreign), "a pointer the driver made is not tidepool's");
  Check(free_fn(foreign) == CUDA_SUCCESS && Counter(stub, "stub_frees") == 1,
        "its synchronous free is passed to the driver");
  Check(free_async_fn(foreign, nullptr) == CUDA_SUCCESS && Counter(stub, "stub_async_frees") == 1,
        "its async free is passed to the driver");

  // cuMemGetInfo counts tidepool's cache as free.
  CUdeviceptr cached = 0;
  alloc(&cached, size_t{8} << 20);
  free_fn(cached);  // the segment stays in tidepool's cache
  size_t free_bytes = 0;
  size_t total_bytes = 0;
  auto info = reinterpret_cast<decltype(&cuMemGetInfo_v2)>(get_info);
  Check(info(&free_bytes, &total_bytes) == CUDA_SUCCESS && total_bytes == (size_t{1} << 30) &&
            free_bytes >= (size_t{100} << 20) + (size_t{8} << 20),
        "cuMemGetInfo: " + std::to_string(free_bytes) + " free, the driver's 100 MiB and tidepool's "
        "cached 8 MiB at least");

  // The runtime API's names, for programs with a shared cudart.
  using CudaMalloc = int (*)(void**, size_t);
  using CudaFree = int (*)(void*);
  auto cuda_malloc = reinterpret_cast<CudaMalloc>(dlsym(RTLD_DEFAULT, "cudaMalloc"));
  auto cuda_free = reinterpret_cast<CudaFree>(dlsym(RTLD_DEFAULT, "cudaFree"));
  Check(cuda_malloc != nullptr && cuda_free != nullptr, "cudaMalloc and cudaFree are exported");
  void* runtime_block = nullptr;
  Check(cuda_malloc(&runtime_block, 1000) == 0 &&
            OwnedByTidepool(reinterpret_cast<CUdeviceptr>(runtime_block)),
        "cudaMalloc is served by tidepool");
  Check(cuda_free(runtime_block) == 0, "cudaFree gives it back");

  // After fork, the child's calls go to the driver; the parent's blocks stay tidepool's.
  CUdeviceptr parent_block = 0;
  alloc(&parent_block, 4096);
  const long driver_allocations = Counter(stub, "stub_allocations");
  const pid_t child = fork();
  if (child == 0) {
    CUdeviceptr in_child = 0;
    const bool passed = alloc(&in_child, 4096) == CUDA_SUCCESS && !OwnedByTidepool(in_child) &&
                        Counter(stub, "stub_allocations") == driver_allocations + 1;
    _exit(passed ? 0 : 1);
  }
  int child_status = -1;
  waitpid(child, &child_status, 0);
  Check(WIFEXITED(child_status) && WEXITSTATUS(child_status) == 0,
        "in a child after fork, cuMemAlloc goes to the driver, not to the parent's tidepool");
  Check(OwnedByTidepool(parent_block) && free_fn(parent_block) == CUDA_SUCCESS &&
            Counter(stub, "stub_allocations") == driver_allocations,
        "the parent's block is still tidepool's, and the parent's driver saw nothing");

  std::printf("preload_test: %d checks, %d failed\n", checks, failures);
  return failures == 0 ? 0 : 1;
}
