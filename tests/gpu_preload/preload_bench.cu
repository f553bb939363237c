// What the interposer costs (preload_programs.sh builds it with nvcc and runs it under
// LD_PRELOAD=libtidepool_preload.so, then without): a cudaMallocAsync + cudaFreeAsync pair of
// 1 MiB on one stream, as the program calls it (through the interposer when preloaded, CUDA's
// own pool otherwise), and in the same process a tidepool_malloc + tidepool_free pair through
// libtidepool.so.1's C API (found with dlopen when the interposer brought it). Median of 51
// batches of 10,000 pairs. Prints one line per measurement.
#include <cuda_runtime.h>
#include <dlfcn.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

using Clock = std::chrono::steady_clock;

template <typename Pair>
double MedianNanoseconds(Pair pair) {
  std::vector<double> batches;
  for (int batch = 0; batch < 51; ++batch) {
    const auto start = Clock::now();
    for (int i = 0; i < 10000; ++i) pair();
    batches.push_back(std::chrono::duration<double, std::nano>(Clock::now() - start).count() /
                      10000);
  }
  std::sort(batches.begin(), batches.end());
  return batches[batches.size() / 2];
}

int main() {
  cudaStream_t stream;
  cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking);
  const size_t bytes = size_t{1} << 20;
  void* warm = nullptr;
  cudaMallocAsync(&warm, bytes, stream);
  cudaFreeAsync(warm, stream);
  cudaStreamSynchronize(stream);
  bool failed = false;
  const double interposed = MedianNanoseconds([&] {
    void* p = nullptr;
    if (cudaMallocAsync(&p, bytes, stream) != cudaSuccess || cudaFreeAsync(p, stream) != cudaSuccess) {
      failed = true;
    }
  });
  std::printf("cudaMallocAsync + cudaFreeAsync (1 MiB, one stream): %.1f ns per pair%s\n",
              interposed, failed ? " (FAILED calls)" : "");
  // Where the time goes: the driver-level pair the runtime calls (the interposer's when
  // preloaded), and one runtime call that does no allocation, for scale.
  using DriverAlloc = int (*)(unsigned long long*, size_t, cudaStream_t);
  using DriverFree = int (*)(unsigned long long, cudaStream_t);
  auto driver_alloc = reinterpret_cast<DriverAlloc>(dlsym(RTLD_DEFAULT, "cuMemAllocAsync"));
  auto driver_free = reinterpret_cast<DriverFree>(dlsym(RTLD_DEFAULT, "cuMemFreeAsync"));
  if (driver_alloc != nullptr && driver_free != nullptr) {
    const double driver = MedianNanoseconds([&] {
      unsigned long long p = 0;
      if (driver_alloc(&p, bytes, stream) != 0 || driver_free(p, stream) != 0) failed = true;
    });
    std::printf("cuMemAllocAsync + cuMemFreeAsync by their exported names: %.1f ns per pair\n",
                driver);
  }
  const double query = MedianNanoseconds([&] { (void)cudaStreamQuery(stream); });
  std::printf("cudaStreamQuery (a runtime call that does not allocate, for scale): %.1f ns\n",
              query);
  void* library = dlopen("libtidepool.so.1", RTLD_NOW | RTLD_NOLOAD);
  if (library != nullptr) {
    using Malloc = int (*)(void**, size_t, int, void*);
    using Free = int (*)(void*);
    auto tp_malloc = reinterpret_cast<Malloc>(dlsym(library, "tidepool_malloc"));
    auto tp_free = reinterpret_cast<Free>(dlsym(library, "tidepool_free"));
    const double direct = MedianNanoseconds([&] {
      void* p = nullptr;
      if (tp_malloc(&p, bytes, 0, stream) != 0 || tp_free(p) != 0) failed = true;
    });
    std::printf("tidepool_malloc + tidepool_free (1 MiB, same stream, same process): %.1f ns per "
                "pair; interposed / direct = %.2fx\n",
                direct, interposed / direct);
  }
  cudaStreamSynchronize(stream);
  cudaStreamDestroy(stream);
  return failed ? 1 : 0;
}
