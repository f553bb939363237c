// The PyTorch anchor of the allocator benchmark: PyTorch's CUDA caching allocator, called from
// C++ (`c10::cuda::CUDACachingAllocator::raw_alloc_with_stream` + `raw_delete`), measured with
// exactly the loops, sizes, thread counts and tables of bench/allocator_bench (both include
// bench/pair_benchmark.h), so its figures stand next to tidepool's.
//
// NOT BUILT BY BAZEL: it links the installed PyTorch (libc10_cuda.so, libc10.so) and the CUDA
// runtime, which exist only on the GPU host. Build it there with bench/build_pytorch_anchor.sh,
// then run it: `pytorch_anchor [--quick]`. PYTORCH_CUDA_ALLOC_CONF applies as in PyTorch.
#include <c10/cuda/CUDACachingAllocator.h>
#include <cuda_runtime_api.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

#include "bench/pair_benchmark.h"

namespace {

using tidepool::bench::Effort;
using tidepool::bench::Fail;

void CheckCuda(cudaError_t result, const char* what) {
  if (result != cudaSuccess) {
    Fail(std::string(what) + ": " + cudaGetErrorName(result) + " (" + cudaGetErrorString(result) +
         ")");
  }
}

class PytorchPairs : public tidepool::bench::PairAllocator {
 public:
  std::string name() const override { return "PyTorch caching allocator"; }
  bool stream_ordered() const override { return true; }
  Effort effort(bool quick) const override {
    return tidepool::bench::FastAllocatorEffort(quick);
  }
  // PyTorch's allocator serves the calling thread's current device.
  void PrepareThread() override { CheckCuda(cudaSetDevice(0), "cudaSetDevice(0)"); }
  void* Allocate(size_t bytes, void* stream) override {
    try {
      return c10::cuda::CUDACachingAllocator::raw_alloc_with_stream(
          bytes, static_cast<cudaStream_t>(stream));
    } catch (const std::exception& error) {
      Fail(std::string("raw_alloc_with_stream: ") + error.what());
    }
  }
  void Free(void* ptr, void*) override {
    try {
      c10::cuda::CUDACachingAllocator::raw_delete(ptr);
    } catch (const std::exception& error) {
      Fail(std::string("raw_delete: ") + error.what());
    }
  }
  void* CreateStream() override {
    cudaStream_t stream = nullptr;
    CheckCuda(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking),
              "cudaStreamCreateWithFlags");
    return stream;
  }
  void SynchronizeStream(void* stream) override {
    CheckCuda(cudaStreamSynchronize(static_cast<cudaStream_t>(stream)), "cudaStreamSynchronize");
  }
  void DestroyStream(void* stream) override {
    CheckCuda(cudaStreamDestroy(static_cast<cudaStream_t>(stream)), "cudaStreamDestroy");
  }
};

}  // namespace

int main(int argc, char** argv) {
  bool quick = false;
  for (int i = 1; i < argc; ++i) {
    if (std::string(argv[i]) == "--quick") {
      quick = true;
    } else {
      Fail(std::string("unknown argument \"") + argv[i] + "\"\nusage: pytorch_anchor [--quick]");
    }
  }
  PytorchPairs pytorch;
  pytorch.PrepareThread();
  cudaDeviceProp properties{};
  CheckCuda(cudaGetDeviceProperties(&properties, 0), "cudaGetDeviceProperties(0)");
  // One device: the benchmark uses GPU 0 only.
  c10::cuda::CUDACachingAllocator::init(1);

  std::printf("# PyTorch caching allocator anchor\n\ndevice: cuda (GPU 0, %s)%s\n\n",
              properties.name, quick ? ", --quick" : "");
  tidepool::bench::RunPairBenchmarks({&pytorch}, quick);
  return 0;
}
